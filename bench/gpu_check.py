"""KERAS_BACKEND=jax python bench/gpu_check.py [--epochs 30] [--batch-size 256] [--allow-cpu]
       KERAS_BACKEND=jax python bench/gpu_check.py --check-runs RUN [RUN ...]

The GPU check (run it through bench/gpu_check.sh, which installs what it needs offline). Trains
kvae on the embedded mnist-5k with the JAX backend, float32 and then mixed precision, and reports
training samples/second (epochs after the first, which compiles); then checks the result: the
saved vae.keras / encoder.keras / decoder.keras reload and compute what the model still in memory
computes (the best epoch's weights, which fit restores into it before saving: a save that wrote
other weights fails, a wrong checkpoint would not), and the validation -log P(X) (IWAE,
k=--eval-k, default 100) is finite and learning. With TensorFlow present it also exports both
halves to ONNX and checks onnxruntime against the trained model.

Prints a table and one PASS/FAIL line; writes bench/results/gpu_check.json (gpu_check-cpu.json
with --allow-cpu and no GPU); exits 1 on FAIL.

--check-runs trains nothing and needs no GPU: it runs the same checks on run folders written
before (by this script, or copied from the GPU box), with each folder's vae.keras as the
reference for its encoder.keras and decoder.keras (no model is in memory), and the NLL that
kvae.fit recorded in its metrics.json; it prints the same PASS/FAIL line and exit status and
writes no results file (it measures no speed).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Wall seconds of each epoch."""

        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

    return EpochTimer()


def train(out: Path, epochs: int, batch_size: int, mixed: bool, eval_k: int = 100):
    """One kvae.fit run; returns (its timing (steady-state samples/s) and metrics, the trained VAE).

    The VAE is the object kvae.fit trained and saved its files from (the callback's model).
    """
    from kvae import data as kdata
    from kvae.config import Config
    from kvae.fit import fit

    config = Config(epochs=epochs, batch_size=batch_size, mixed_precision=mixed, out=str(out),
                    eval_k=eval_k, kl_warmup=min(5, epochs))
    timer = epoch_timer()
    metrics = fit(config, callbacks=[timer])
    samples = kdata.steps_per_epoch(metrics["n_train"], batch_size) * batch_size
    steady = timer.seconds[1:] or timer.seconds
    row = {"precision": "mixed_float16" if mixed else "float32", "epochs": epochs,
           "batch_size": batch_size, "first_epoch_s": round(timer.seconds[0], 2),
           "epoch_s": round(statistics.median(steady), 4),
           "samples_per_s": round(samples / statistics.median(steady), 1),
           "eval_k": eval_k, "held_out_nll": round(metrics["eval"]["nll"], 2), "run": str(out)}
    return row, timer.model


@functools.cache
def check_images():
    """The 64 binarized validation digits every check encodes (loaded once per process)."""
    from kvae import data as kdata

    return kdata.binarize_fixed(kdata.load("mnist-5k").x_val[:64], "dynamic")


def check(run: Path, trained=None) -> list[str]:
    """Problems with the run folder's saved files against `trained`, the VAE kvae.fit trained
    and saved them from (empty list: all good). Without `trained` (--check-runs) the folder's own
    vae.keras is the reference for its encoder.keras and decoder.keras."""
    import keras
    import numpy as np

    from kvae.model import load_vae

    problems = []
    reloaded = load_vae(run / "vae.keras")
    reference = "trained (in memory)" if trained is not None else "vae.keras"
    model = trained if trained is not None else reloaded
    x = check_images()
    z = np.random.default_rng(0).standard_normal((64, model.latent_dim)).astype(np.float32)
    want_loc, want_scale = (np.asarray(t) for t in model.encode(x))
    want_x = np.asarray(model.decode(z))
    loc, scale = (np.asarray(t) for t in keras.saving.load_model(run / "encoder.keras")(x))
    x_mean = np.asarray(keras.saving.load_model(run / "decoder.keras")(z))
    compared = [("encoder.keras loc", loc, want_loc), ("encoder.keras scale", scale, want_scale),
                ("decoder.keras x_mean", x_mean, want_x)]
    if trained is not None:  # vae.keras against itself would be 0 by construction
        vae_loc, vae_scale = (np.asarray(t) for t in reloaded.encode(x))
        compared = [("vae.keras loc", vae_loc, want_loc), ("vae.keras scale", vae_scale, want_scale),
                    ("vae.keras x_mean", np.asarray(reloaded.decode(z)), want_x), *compared]
    for name, got, want in compared:
        diff = float(np.abs(got - want).max())
        print(f"  {name:20s} reloaded vs {reference}: max abs diff {diff:.1e}")
        if not diff < 1e-4:
            problems.append(f"{name} differs from {'the trained model' if trained is not None else 'vae.keras'}"
                            f" by {diff:.1e} after reloading")
    if not (x_mean.min() >= 0 and x_mean.max() <= 1 and (scale > 0).all()):
        problems.append("outputs out of range (x_mean outside [0, 1] or scale <= 0)")
    if importlib.util.find_spec("tensorflow") and importlib.util.find_spec("tf2onnx"):
        problems += check_onnx(run, x, z, want_loc, want_x)
    else:
        print("  export: no TensorFlow here; copy the run folder to a TensorFlow machine and run "
              "export/to_onnx.py / export/to_tflite.py there")
    return problems


def check_onnx(run: Path, x, z, loc, x_mean) -> list[str]:
    import subprocess

    import numpy as np
    import onnxruntime as ort

    out = Path(tempfile.mkdtemp(prefix="gpu-check-onnx-"))
    script = Path(__file__).resolve().parents[1] / "export" / "to_onnx.py"
    # the exporter needs the TensorFlow backend: a fresh process
    done = subprocess.run([sys.executable, str(script), str(run), "--out", str(out), "--quantize", "none"],
                          capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    if done.returncode != 0:
        return [f"ONNX export failed: {done.stderr.strip().splitlines()[-1:]}"]
    problems = []
    for half, inputs, want, output in (("decoder", z, x_mean, "x_mean"), ("encoder", x, loc, "loc")):
        session = ort.InferenceSession(str(out / f"{half}.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: inputs})))[output]
        diff = float(np.abs(got - want).max())
        print(f"  {half + '.onnx':20s} onnxruntime vs trained (in memory): max abs diff {diff:.1e}")
        if not diff < 1e-4:
            problems.append(f"{half}.onnx differs by {diff:.1e}")
    return problems


def recheck(runs: list[str]) -> tuple[list[dict], list[str]]:
    """--check-runs: check() on each folder against its own vae.keras; rows from its config.json
    and metrics.json (no timing)."""
    rows, problems = [], []
    for run in map(Path, runs):
        if not ((run / "config.json").is_file() and (run / "metrics.json").is_file()):
            sys.exit(f"gpu_check: {run} is not a finished kvae.fit run (no config.json / metrics.json)")
        config = json.loads((run / "config.json").read_text())
        evaluation = json.loads((run / "metrics.json").read_text()).get("eval") or {}
        if "nll" not in evaluation:
            sys.exit(f"gpu_check: {run}/metrics.json has no held-out NLL (trained with --eval-k 0?)")
        print(f"check {run}:")
        problems += check(run)
        rows.append({"precision": "mixed_float16" if config.get("mixed_precision") else "float32",
                     "epochs": config.get("epochs"), "batch_size": config.get("batch_size"),
                     "eval_k": evaluation.get("k"), "held_out_nll": round(evaluation["nll"], 2),
                     "run": str(run)})
    print(f"\n{'precision':15s} {'NLL':>10s} {'k':>5s}  run")
    for r in rows:
        print(f"{r['precision']:15s} {r['held_out_nll']:10.2f} {r['eval_k']!s:>5s}  {r['run']}")
    print()
    return rows, problems


def nll_problems(rows: list[dict], max_nll: float) -> list[str]:
    return [f"{r['precision']} NLL is {r['held_out_nll']}" for r in rows
            if not 0 < r["held_out_nll"] < max_nll]


def verdict(problems: list[str], wrote: Path | None) -> None:
    """The one PASS/FAIL line and exit status, of a training run and of --check-runs alike."""
    where = f" (wrote {wrote})" if wrote else " (no results file: nothing was timed)"
    print(("PASS" if not problems else "FAIL: " + "; ".join(problems)) + where)
    sys.exit(1 if problems else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (default 256)")
    parser.add_argument("--eval-k", type=int, default=100,
                        help="importance samples of the held-out NLL (default 100; at least 1)")
    parser.add_argument("--out", default=None, help="folder for the two runs (default: a temp folder)")
    parser.add_argument("--max-nll", type=float, default=130.0,
                        help="fail if a run's held-out NLL is above this (default 130: 30 epochs reach ~105)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (to test this script)")
    parser.add_argument("--results", default=str(RESULTS), help="where gpu_check.json goes (default bench/results)")
    parser.add_argument("--check-runs", nargs="+", metavar="RUN",
                        help="train nothing (no GPU needed): check these finished run folders and the "
                             "NLL in their metrics.json against --max-nll; writes no results file")
    args = parser.parse_args()
    if args.eval_k < 1:
        parser.error("--eval-k must be at least 1 (the check needs the held-out NLL)")

    import jax
    import keras

    if keras.backend.backend() != "jax":
        sys.exit("gpu_check: set KERAS_BACKEND=jax (bench/gpu_check.sh does)")
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus and not args.allow_cpu and not args.check_runs:
        sys.exit(f"gpu_check: JAX sees no GPU (devices: {jax.devices()}); install jax with CUDA "
                 "(pip install 'jax[cuda12]') or pass --allow-cpu")
    device = gpus[0].device_kind if gpus else f"CPU ({platform.processor() or platform.machine()})"
    print(f"gpu_check: jax {jax.__version__}, keras {keras.__version__}, device {device}")
    if args.check_runs:
        rows, problems = recheck(args.check_runs)
        verdict(problems + nll_problems(rows, args.max_nll), None)
    out = Path(args.out or tempfile.mkdtemp(prefix="kvae-gpu-check-"))
    rows, problems = [], []
    for mixed in (False, True):
        row, trained = train(out / ("mixed" if mixed else "float32"), args.epochs, args.batch_size, mixed,
                             args.eval_k)
        print(f"check {row['run']}:")  # now, while the trained model is the one in memory
        problems += check(Path(row["run"]), trained)
        rows.append(row)
    print(f"\n{'precision':15s} {'samples/s':>10s} {'epoch s':>8s} {'1st epoch s':>12s} "
          f"{f'NLL k={args.eval_k}':>10s}")
    for r in rows:
        print(f"{r['precision']:15s} {r['samples_per_s']:10.0f} {r['epoch_s']:8.3f} "
              f"{r['first_epoch_s']:12.1f} {r['held_out_nll']:10.2f}")
    ratio = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    print(f"mixed precision / float32: {ratio:.2f}x\n")
    problems += nll_problems(rows, args.max_nll)
    result = {"device": device, "jax": jax.__version__, "keras": keras.__version__,
              "backend": "jax", "runs": rows, "mixed_over_float32": round(ratio, 3),
              "problems": problems, "passed": not problems}
    path = Path(args.results) / ("gpu_check.json" if gpus else "gpu_check-cpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    from kvae.files import atomic_write_json

    atomic_write_json(path, result)
    verdict(problems, path)


if __name__ == "__main__":
    main()
