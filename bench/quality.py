"""python bench/quality.py [--out runs/bench-quality] [--every 5] [--k 1000] [kvae.fit flags...]

Validation NLL against training time: trains the quickstart configuration (or the kvae.fit flags
given after the options) and, every `--every` epochs, estimates -log P(X) on the 500 mnist-5k
validation digits with the IWAE bound (k = 100; evaluation time is excluded from the clock). At
the end, the best model (by validation loss) is evaluated with `--k` samples, the figure the goal
is judged by (issue: NLL <= 90 nats within 3 minutes of training on 2 CPU cores). These digits
pick the best epoch and chose the defaults, so every number here is a validation number.

Prints a table, writes bench/results/quality.json and bench/results/quality.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import keras
import numpy as np

from kvae import data as kdata
from kvae.config import add_config_flags, config_from_args
from kvae.evaluate import iwae_nll, summarize
from kvae.fit import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py, also when loaded by path
import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=5, help="evaluate every N epochs (k=100)")
    parser.add_argument("--k", type=int, default=1000, help="importance samples for the final NLL")
    add_config_flags(parser)
    args = parser.parse_args()
    args.out = args.out or "runs/bench-quality"
    config = config_from_args(args)
    if config.conditional:  # its NLL is -log P(X|y); this benchmark scores unconditional models
        sys.exit("bench/quality.py: error: --conditional is not measured here: use python bench/conditional.py "
                 "RUN for a conditional run")
    shutil.rmtree(config.out, ignore_errors=True)
    data = kdata.load(config.dataset, config.data_dir, config.val_size, image_size=config.image_size)
    x_val = kdata.binarize_fixed(data.x_val, config.resolved_binarize)
    curve = NLLCurve(x_val, args.every)
    fit(config, callbacks=[curve])

    from kvae.model import load_vae

    final = summarize(iwae_nll(load_vae(Path(config.out) / "vae.keras"), x_val, args.k, progress=True))
    minutes = curve.train_seconds / 60
    print(f"final (best epoch by validation loss): validation NLL(k={args.k}) {final['nll']:.2f} +- "
          f"{final['nll_se']:.2f} nats after {minutes:.2f} min of training "
          f"(goal: <= 90 nats within 3 min)")
    RESULTS.mkdir(exist_ok=True)
    result = {"config": config.to_dict(), "machine": machine.describe(),
              "curve": curve.points, "train_seconds": curve.train_seconds,
              "final": {**final, "k": args.k, "n": len(x_val)}}
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "quality.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["curve"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.errorbar([p["train_seconds"] / 60 for p in pts], [p["nll"] for p in pts],
                yerr=[p["nll_se"] for p in pts], marker="o", ms=3, label="validation NLL, k=100")
    final = result["final"]
    ax.errorbar([result["train_seconds"] / 60], [final["nll"]], yerr=[final["nll_se"]], marker="*",
                ms=10, color="C3", label=f"best epoch, k={final['k']}")
    ax.axhline(90, color="grey", ls="--", lw=1, label="goal: 90 nats")
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("-log P(X) (nats)")
    ax.set_ylim(top=min(140, max(p["nll"] for p in pts) + 2))
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    main()
