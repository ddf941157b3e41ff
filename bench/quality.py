"""python bench/quality.py [--compare] [--every 10] [--k 1000] [--samples 1000] [kvae.fit flags...]

Held-out NLL, training time and sample quality of the quickstart configuration (or the kvae.fit
flags given after the options). Trains it; every `--every` epochs estimates -log P(X) on the 500
mnist-5k validation digits with the IWAE bound (k = 100; evaluation time is excluded from the
clock). At the end the best model (by validation loss) is evaluated with `--k` samples, the
figure the quickstart is judged by (issue 16: <= 89 nats), and `--samples` images drawn from it
are judged by bench/digits.py's classifier: from N(0, I) ("standard") and from the run's
prior.json when it has one ("fitted": the learned P(z) of the default model, or the sampling
prior fitted to the codes of a model with P(z) = N(0, I); kvae.prior).

`--compare` first trains the PREVIOUS defaults (the quickstart before issue 16: `PREVIOUS`
below), then the configuration asked for, in this one process on this machine, and reports the
ratio of their training times: machines differ by 2x, so only a ratio measured side by side
means anything. These digits pick the best epoch and chose the defaults, so every number here is
a validation number.

Prints a table; writes bench/results/quality.json (and quality.png: NLL against training time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import keras
import numpy as np

from kvae import data as kdata
from kvae.config import Config, add_config_flags, config_from_args
from kvae.evaluate import iwae_nll, summarize
from kvae.files import atomic_write_json
from kvae.fit import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py, also when loaded by path
import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GOAL = 89.0  # nats, issue 16
# The quickstart's defaults before issue 16, where they differ from today's (kvae.config.Config).
PREVIOUS = {"arch": "conv", "dropout": 0.0, "encoder_noise": 0.0, "free_bits": 0.0, "prior_mixture": 0,
            "prior_components": 0, "epochs": 100, "kl_warmup": 80}
SCHEDULE = ("epochs", "kl_warmup")  # PREVIOUS's unless given: then both sides train as told


class NLLCurve(keras.callbacks.Callback):
    """Every `every` epochs: (training seconds so far, validation IWAE NLL with k samples)."""

    def __init__(self, x_val: np.ndarray, every: int, k: int = 100):
        super().__init__()
        self.x, self.every, self.k = x_val, every, k
        self.points: list[dict] = []

    def on_train_begin(self, logs=None):
        self.train_seconds, self.start = 0.0, time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.train_seconds += time.perf_counter() - self.start
        if (epoch + 1) % self.every == 0 or epoch + 1 == self.params["epochs"]:
            result = summarize(iwae_nll(self.model, self.x, self.k))
            self.points.append({"epoch": epoch + 1, "train_seconds": round(self.train_seconds, 1),
                                "nll": result["nll"], "nll_se": result["nll_se"], "k": self.k})
            print(f"  epoch {epoch + 1:3d}  {self.train_seconds:6.1f} s  NLL(k={self.k}) "
                  f"{result['nll']:.2f} +- {result['nll_se']:.2f}", flush=True)
        self.start = time.perf_counter()


def sample_measures(vae, fitted: dict | None, n: int, judge, seed: int = 0) -> dict:
    """bench/digits.py's sample_quality of n images from the Keras VAE, per sampling prior:
    {"standard": ... (z ~ N(0, I)), "fitted": ... (z from `fitted`, when given)}.

    Args:
      judge: (classifier, digits) from digits.classifier().
    """
    import digits
    from kvae import prior as kprior

    model, real = judge
    result = {}
    for name in ("standard", "fitted"):
        if name == "fitted" and fitted is None:
            continue
        z = kprior.draw(None if name == "standard" else fitted, n, vae.latent_dim,
                        np.random.default_rng(seed))
        images = np.concatenate([np.asarray(vae.decode(z[i:i + 500])) for i in range(0, n, 500)])
        result[name] = digits.sample_quality(model, images, real.x_val, real.x_vae_train, seed)
    return result


def measure(config: Config, every: int, k: int, samples: int, judge) -> dict:
    """Trains `config` with an NLL curve; the best model's NLL (k samples) and sample measures."""
    from kvae import prior as kprior
    from kvae.model import load_vae

    shutil.rmtree(config.out, ignore_errors=True)
    data = kdata.load(config.dataset, config.data_dir, config.val_size, image_size=config.image_size)
    x_val = kdata.binarize_fixed(data.x_val, config.resolved_binarize)
    curve = NLLCurve(x_val, every)
    fit(config, callbacks=[curve])
    vae = load_vae(Path(config.out) / "vae.keras")
    final = summarize(iwae_nll(vae, x_val, k, progress=True))
    prior_path = Path(config.out) / kprior.FILE
    fitted = kprior.read(prior_path, vae.latent_dim) if prior_path.exists() else None
    quality = sample_measures(vae, fitted, samples, judge) if samples else {}
    return {"config": config.resolved().to_dict(), "curve": curve.points,
            "train_seconds": curve.train_seconds, "final": {**final, "k": k, "n": len(x_val)},
            "samples": quality}


def previous_defaults(config: Config) -> Config:
    """`config` with the PREVIOUS defaults in place of today's, in its own run folder."""
    previous = {k: v for k, v in PREVIOUS.items() if k not in SCHEDULE or getattr(config, k) is None}
    return dataclasses.replace(config, **previous, out=config.out + "-previous")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", action="store_true",
                        help="first train the previous defaults (PREVIOUS), side by side")
    parser.add_argument("--every", type=int, default=5, help="evaluate every N epochs (k=100)")
    parser.add_argument("--k", type=int, default=1000, help="importance samples for the final NLL")
    parser.add_argument("--samples", type=int, default=1000,
                        help="images judged by bench/digits.py's classifier (0 = none)")
    parser.add_argument("--results", default=str(RESULTS), help="folder of quality.json and quality.png")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    args.out = args.out or "runs/bench-quality"
    config = config_from_args(args)
    if config.conditional:  # its NLL is -log P(X|y); this benchmark scores unconditional models
        sys.exit("bench/quality.py: error: --conditional is not measured here: use python bench/conditional.py "
                 "RUN for a conditional run")
    judge = None
    if args.samples:
        import digits

        model, real, _ = digits.classifier("mnist-5k")
        judge = (model, real)
    configs = {"previous": previous_defaults(config)} if args.compare else {}
    configs["current"] = config
    results = {}
    for name, each in configs.items():
        print(f"== {name}: {json.dumps({k: v for k, v in each.to_dict().items() if k in PREVIOUS})}",
              flush=True)
        results[name] = measure(each, args.every, args.k, args.samples, judge)
    result = {"machine": machine.describe(), **results["current"]}
    if args.compare:
        result["previous"] = results["previous"]
        result["time_ratio"] = results["current"]["train_seconds"] / results["previous"]["train_seconds"]
    print(table(results))
    if args.compare:
        print(f"training time, current / previous defaults: {result['time_ratio']:.2f}x "
              "(measured side by side in this run)")
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results_dir / "quality.json", result)
    plot(results, results_dir / "quality.png")


def table(results: dict) -> str:
    rows = ["| defaults | train s | NLL (k) | prior | confident | classes (bits) | Frechet (floor) |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        final = r["final"]
        nll = f"{final['nll']:.2f} +- {final['nll_se']:.2f} ({final['k']})"
        for prior, q in (r["samples"] or {"-": None}).items():
            judged = ("| - | - | - |" if q is None else
                      f"| {q['confident_share']:.1%} | {q['class_entropy_bits']:.2f} | "
                      f"{q['frechet']:.1f} ({q['frechet_floor']:.1f}) |")
            rows.append(f"| {name} | {r['train_seconds']:.0f} | {nll} | {prior} {judged}")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, result) in enumerate(results.items()):
        pts = result["curve"]
        ax.errorbar([p["train_seconds"] / 60 for p in pts], [p["nll"] for p in pts],
                    yerr=[p["nll_se"] for p in pts], marker="o", ms=3, color=f"C{i}",
                    label=f"{name} defaults, k=100")
        final = result["final"]
        ax.errorbar([result["train_seconds"] / 60], [final["nll"]], yerr=[final["nll_se"]],
                    marker="*", ms=10, color=f"C{i}", label=f"{name}: best epoch, k={final['k']}")
    ax.axhline(GOAL, color="grey", ls="--", lw=1, label=f"goal: {GOAL:g} nats")
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("-log P(X) (nats)")
    lowest = min(min(p["nll"] for p in r["curve"]) for r in results.values())
    ax.set_ylim(top=min(140, lowest + 40))
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    main()
