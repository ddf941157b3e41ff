"""KERAS_BACKEND=jax python bench/gpu_check.py [--epochs 30] [--batch-size 256] [--allow-cpu]

The GPU check (run it through bench/gpu_check.sh, which installs what it needs offline). Trains
kvae on the embedded mnist-5k with the JAX backend, float32 and then mixed precision, and reports
training samples/second (epochs after the first, which compiles); then checks the result: the
saved vae.keras / encoder.keras / decoder.keras reload and compute what the model still in memory
computes (the best epoch's weights, which fit restores into it before saving: a save that wrote
other weights fails, a wrong checkpoint would not), and the validation -log P(X) (IWAE,
k=100) is finite and learning. With TensorFlow present it also exports both halves to ONNX and
checks onnxruntime against the trained model.

Prints a table and one PASS/FAIL line; writes bench/results/gpu_check.json (gpu_check-cpu.json
with --allow-cpu and no GPU); exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
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


def train(out: Path, epochs: int, batch_size: int, mixed: bool):
    """One kvae.fit run; returns (its timing (steady-state samples/s) and metrics, the trained VAE).

    The VAE is the object kvae.fit trained and saved its files from (the callback's model).
    """
    from kvae import data as kdata
    from kvae.config import Config
    from kvae.fit import fit

    config = Config(epochs=epochs, batch_size=batch_size, mixed_precision=mixed, out=str(out),
                    eval_k=100, kl_warmup=min(5, epochs))
    timer = epoch_timer()
    metrics = fit(config, callbacks=[timer])
    samples = kdata.steps_per_epoch(metrics["n_train"], batch_size) * batch_size
    steady = timer.seconds[1:] or timer.seconds
    row = {"precision": "mixed_float16" if mixed else "float32", "epochs": epochs,
           "batch_size": batch_size, "first_epoch_s": round(timer.seconds[0], 2),
           "epoch_s": round(statistics.median(steady), 4),
           "samples_per_s": round(samples / statistics.median(steady), 1),
           "held_out_nll_k100": round(metrics["eval"]["nll"], 2), "run": str(out)}
    return row, timer.model


def check(run: Path, trained) -> list[str]:
    """Problems with the run folder's saved files against `trained`, the VAE kvae.fit trained
    and saved them from (empty list: all good)."""
    import keras
    import numpy as np

    from kvae import data as kdata
    from kvae.model import load_vae

    problems = []
    x = kdata.binarize_fixed(kdata.load("mnist-5k").x_val[:64], "dynamic")
    z = np.random.default_rng(0).standard_normal((64, trained.latent_dim)).astype(np.float32)
    want_loc, want_scale = (np.asarray(t) for t in trained.encode(x))
    want_x = np.asarray(trained.decode(z))
    reloaded = load_vae(run / "vae.keras")
    loc, scale = (np.asarray(t) for t in keras.saving.load_model(run / "encoder.keras")(x))
    x_mean = np.asarray(keras.saving.load_model(run / "decoder.keras")(z))
    vae_loc, vae_scale = (np.asarray(t) for t in reloaded.encode(x))
    for name, got, want in (("vae.keras loc", vae_loc, want_loc),
                            ("vae.keras scale", vae_scale, want_scale),
                            ("vae.keras x_mean", np.asarray(reloaded.decode(z)), want_x),
                            ("encoder.keras loc", loc, want_loc),
                            ("encoder.keras scale", scale, want_scale),
                            ("decoder.keras x_mean", x_mean, want_x)):
        diff = float(np.abs(got - want).max())
        print(f"  {name:20s} reloaded vs trained (in memory): max abs diff {diff:.1e}")
        if not diff < 1e-4:
            problems.append(f"{name} differs from the trained model by {diff:.1e} after reloading")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (default 256)")
    parser.add_argument("--out", default=None, help="folder for the two runs (default: a temp folder)")
    parser.add_argument("--max-nll", type=float, default=130.0,
                        help="fail if a run's held-out NLL is above this (default 130: 30 epochs reach ~105)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (to test this script)")
    parser.add_argument("--results", default=str(RESULTS), help="where gpu_check.json goes (default bench/results)")
    args = parser.parse_args()

    import jax
    import keras

    if keras.backend.backend() != "jax":
        sys.exit("gpu_check: set KERAS_BACKEND=jax (bench/gpu_check.sh does)")
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus and not args.allow_cpu:
        sys.exit(f"gpu_check: JAX sees no GPU (devices: {jax.devices()}); install jax with CUDA "
                 "(pip install 'jax[cuda12]') or pass --allow-cpu")
    device = gpus[0].device_kind if gpus else f"CPU ({platform.processor() or platform.machine()})"
    print(f"gpu_check: jax {jax.__version__}, keras {keras.__version__}, device {device}")
    out = Path(args.out or tempfile.mkdtemp(prefix="kvae-gpu-check-"))
    rows, problems = [], []
    for mixed in (False, True):
        row, trained = train(out / ("mixed" if mixed else "float32"), args.epochs, args.batch_size, mixed)
        print(f"check {row['run']}:")  # now, while the trained model is the one in memory
        problems += check(Path(row["run"]), trained)
        rows.append(row)
    print(f"\n{'precision':15s} {'samples/s':>10s} {'epoch s':>8s} {'1st epoch s':>12s} {'NLL k=100':>10s}")
    for r in rows:
        print(f"{r['precision']:15s} {r['samples_per_s']:10.0f} {r['epoch_s']:8.3f} "
              f"{r['first_epoch_s']:12.1f} {r['held_out_nll_k100']:10.2f}")
    ratio = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    print(f"mixed precision / float32: {ratio:.2f}x\n")
    problems += [f"{r['precision']} NLL is {r['held_out_nll_k100']}" for r in rows
                 if not 0 < r["held_out_nll_k100"] < args.max_nll]
    result = {"device": device, "jax": jax.__version__, "keras": keras.__version__,
              "backend": "jax", "runs": rows, "mixed_over_float32": round(ratio, 3),
              "problems": problems, "passed": not problems}
    path = Path(args.results) / ("gpu_check.json" if gpus else "gpu_check-cpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(("PASS" if not problems else "FAIL: " + "; ".join(problems)) + f" (wrote {path})")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
