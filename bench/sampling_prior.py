"""python bench/sampling_prior.py RUN [--components 0 1 10 50 100] [--samples 1000]

Which sampling prior gives the most digit-like samples from a trained run: N(0, I) (0
components) against Gaussian mixtures of K components fitted to the training codes
(kvae.prior, as kvae.fit fits them), each judged by bench/digits.py's classifier on `--samples`
images (the share labelled with >= 0.9 confidence, the entropy of the predicted classes, and
the Frechet distance to held-out digits with real digits' distance as the floor, and the
median pixel distance of a sample to its nearest training digit next to that of real held-out
digits: more components fit the codes closer, and a prior that only replays training codes
would show up there as copies). The default
of `--prior-components` comes from this table. The NLL does not change: it uses N(0, I).

Prints a table; writes bench/results/sampling_prior.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/digits.py, bench/quality.py
import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="an unconditional run folder trained on mnist-5k")
    parser.add_argument("--components", type=int, nargs="+", default=[0, 1, 10, 50, 100, 200],
                        help="mixture sizes to compare (0 = N(0, I))")
    parser.add_argument("--samples", type=int, default=1000, help="images judged per prior")
    parser.add_argument("--results", default=str(RESULTS), help="folder of sampling_prior.json")
    args = parser.parse_args(argv)

    import digits
    import quality

    from kvae import data as kdata
    from kvae import prior as kprior
    from kvae.config import Config
    from kvae.fit import training_codes
    from kvae.model import load_vae

    run = Path(args.run)
    config = Config.from_run(run / "config.json")
    vae = load_vae(run / "vae.keras")
    if vae.num_classes:
        sys.exit("bench/sampling_prior.py: error: a conditional run: use bench/conditional.py")
    if vae.model_prior() is not None:
        sys.exit("bench/sampling_prior.py: error: this run learned its prior (--prior-mixture); the "
                 "fitted priors compared here are for a model with P(z) = N(0, I): train it with "
                 "--prior-mixture 0")
    data = kdata.load(config.dataset, config.data_dir, config.val_size, image_size=config.image_size)
    codes = training_codes(vae, data, config)
    model, real, _ = digits.classifier("mnist-5k")
    rows = []
    for k in args.components:
        start = time.perf_counter()
        fitted = kprior.fit(codes, k, seed=config.seed) if k else None
        seconds = time.perf_counter() - start
        measures = quality.sample_measures(vae, fitted, args.samples, (model, real))
        q = measures["fitted" if k else "standard"]
        rows.append({"components": k, "fit_seconds": round(seconds, 2), **q})
        print(f"K={k:4d}  confident {q['confident_share']:.1%}  classes {q['class_entropy_bits']:.2f} bits  "
              f"Frechet {q['frechet']:.1f} (floor {q['frechet_floor']:.1f})  nearest training digit "
              f"{q['nearest_train']:.2f} (real: {q['nearest_train_real']:.2f})  fit {seconds:.1f} s", flush=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    record = {"run": str(run), "config": config.to_dict(), "n_codes": len(codes),
              "machine": machine.describe(), "rows": rows}
    from kvae.files import atomic_write_json

    atomic_write_json(results / "sampling_prior.json", record)


if __name__ == "__main__":
    main()
