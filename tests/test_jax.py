"""The same model under KERAS_BACKEND=jax, in an environment without TensorFlow.

The JAX environment is separate (`.venv-jax`, from requirements-jax.txt: tfp-nightly and
TensorFlow's tensorflow-probability cannot share one); `.ci/run` builds it. A run trained there is
then loaded, evaluated and exported here, under TensorFlow, and must agree with what JAX computed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
JAX_PYTHON = Path(os.environ.get("KVAE_JAX_PYTHON") or ROOT / ".venv-jax" / "bin" / "python")
# the small run of conftest.trained_run, under JAX
RUN = ["--latent-dim", "8", "--hidden", "64", "--eval-k", "10", "--lr", "1e-3", "--kl-warmup", "0",
       "--batch-size", "128"]
EXPORT_TOL = 1e-5  # exported file (onnxruntime / LiteRT) vs the JAX outputs, every output

# Runs in the JAX environment: loads the run's halves and records what they compute.
PROBE = """
import sys, numpy as np, keras
from kvae import data
try:
    import tensorflow
    raise SystemExit("tensorflow is importable in the JAX environment")
except ImportError:
    pass
run = sys.argv[1]
x = data.binarize_fixed(data.load("mnist-5k").x_val[:16], "dynamic")
z = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
loc, scale = keras.saving.load_model(run + "/encoder.keras")(x)
x_mean = keras.saving.load_model(run + "/decoder.keras")(z)
np.savez(run + "/jax_outputs.npz", x=x, z=z, loc=np.asarray(loc), scale=np.asarray(scale),
         x_mean=np.asarray(x_mean))
assert "tensorflow" not in sys.modules, "kvae imported TensorFlow under the JAX backend"
print(keras.backend.backend())
"""

# Runs in the JAX environment: bench/gpu_check.py's check() on a run folder, first against a model
# loaded from the folder's vae.keras (must pass), then against the same model with changed weights.
CHECK_AGAINST_CHANGED_MODEL = """
import importlib.util, json, sys
from pathlib import Path
from kvae.model import load_vae
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
run = Path(sys.argv[2])
model = load_vae(run / "vae.keras")
assert gpu_check.check(run, model) == [], "the files against a model equal to them"
for v in model.trainable_variables:
    v.assign(v + 0.05)
print(json.dumps(gpu_check.check(run, model)))
"""


def jax_env() -> dict:
    if not JAX_PYTHON.exists():
        message = (f"no JAX environment at {JAX_PYTHON}: python -m venv .venv-jax && "
                   ".venv-jax/bin/pip install -r requirements-jax.txt && "
                   ".venv-jax/bin/pip install --no-deps -e .")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def jax(*args: str, cwd=None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(JAX_PYTHON), *args], env=jax_env(), capture_output=True, text=True,
                            timeout=900, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


# jax_run's schedule: a constant learning rate, so that it is also the uninterrupted run the resume
# test compares with (extending --epochs on resume would stretch a cosine schedule; the cosine
# schedule trains under JAX in the gpu_check runs)
JAX_RUN = [*RUN, "--lr-schedule", "constant"]


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """A run trained under JAX, with its halves' outputs on fixed inputs in jax_outputs.npz."""
    out = tmp_path_factory.mktemp("jax") / "run"
    fit = jax("-m", "kvae.fit", "--out", str(out), "--epochs", "2", *JAX_RUN)
    probe = jax("-c", PROBE, str(out))
    return out, fit.stdout, probe.stdout


@pytest.fixture(scope="module")
def gpu_check_runs(tmp_path_factory):
    """bench/gpu_check.sh --allow-cpu --epochs 1 once: (its folder, the finished process); the two
    runs it trained (float32, mixed precision) are in FOLDER/runs, its report in FOLDER."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = {**jax_env(), "PYTHON": str(JAX_PYTHON)}
    # --eval-k 10: the same NLL check on a 10-sample IWAE bound (k=100 is most of the run on a CPU)
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--allow-cpu", "--epochs", "1",
                             "--eval-k", "10", "--max-nll", "400", "--out", str(tmp / "runs"),
                             "--results", str(tmp)], env=env, capture_output=True, text=True,
                            timeout=900)
    return tmp, result


def test_trains_under_jax_without_tensorflow(jax_run):
    out, fit_log, probe_log = jax_run
    assert "Keras backend jax" in fit_log and probe_log.strip() == "jax"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert 60 < metrics["eval"]["nll"] < 250  # two epochs on real digits: learning, not NaN
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "kl_loss" in history[0] and "val_reconstruction_loss" in history[0]
    for name in ("vae.keras", "encoder.keras", "decoder.keras", "samples.png"):
        assert (out / name).stat().st_size > 0


def test_jax_run_loads_under_tensorflow_with_the_same_outputs(jax_run):
    import keras

    out, _, _ = jax_run
    assert keras.backend.backend() == "tensorflow"
    ref = np.load(out / "jax_outputs.npz")
    loc, scale = keras.saving.load_model(out / "encoder.keras")(ref["x"])
    np.testing.assert_allclose(np.asarray(loc), ref["loc"], atol=1e-5)
    np.testing.assert_allclose(np.asarray(scale), ref["scale"], atol=1e-5)
    x_mean = keras.saving.load_model(out / "decoder.keras")(ref["z"])
    np.testing.assert_allclose(np.asarray(x_mean), ref["x_mean"], atol=1e-5)


def test_held_out_nll_agrees_across_backends(jax_run):
    from kvae import data
    from kvae.evaluate import evaluate
    from kvae.model import load_vae

    out, _, _ = jax_run
    under_jax = json.loads((out / "metrics.json").read_text())["eval"]
    under_tf = evaluate(load_vae(out / "vae.keras"), data.load("mnist-5k").x_val, "dynamic",
                        k=under_jax["k"], seed=under_jax["seed"])
    assert abs(under_tf["nll"] - under_jax["nll"]) < 1e-3  # the same eps, the same model
    assert abs(under_tf["kl"] - under_jax["kl"]) < 1e-3


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_jax_run_exports_with_parity(jax_run, fmt):
    from kvae import export_onnx, export_tflite
    from kvae.sessions import Session

    out, _, _ = jax_run
    target = out / f"export-{fmt}"
    export_fn = export_onnx.export_onnx if fmt == "onnx" else export_tflite.export_tflite
    manifest = export_fn(out, target, quantize=())
    assert {f"encoder.{fmt}", f"decoder.{fmt}"} <= set(manifest["files"])
    ref = np.load(out / "jax_outputs.npz")
    decoder, encoder = (Session(target / f"{half}.{fmt}") for half in ("decoder", "encoder"))
    got = {**encoder.run(x=ref["x"]), **decoder.run(z=ref["z"])}
    diffs = {name: float(np.abs(got[name] - ref[name]).max()) for name in ("loc", "scale", "x_mean")}
    print(f"{fmt} export vs JAX: max abs diff " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert all(d <= EXPORT_TOL for d in diffs.values()), (fmt, diffs)


def test_jax_resume_matches_an_uninterrupted_run(jax_run, tmp_path):
    # the uninterrupted run is jax_run (2 epochs, constant learning rate); this one is stopped
    # after 1 epoch and resumed to 2 (--eval-k 0: the final NLL does not touch training)
    whole_run = jax_run[0]
    jax("-m", "kvae.fit", "--out", str(tmp_path / "resumed"), "--epochs", "1", *JAX_RUN, "--eval-k", "0")
    jax("-m", "kvae.fit", "--out", str(tmp_path / "resumed"), "--resume", "--epochs", "2")
    whole, resumed = ((folder / "history.csv").read_text().splitlines()
                      for folder in (whole_run, tmp_path / "resumed"))
    assert len(whole) == 3 and resumed == whole  # every epoch once, the same losses to the digit
    import keras

    z = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    a, b = (keras.saving.load_model(folder / "decoder.keras")(z) for folder in (whole_run, tmp_path / "resumed"))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_jax_mixed_precision_and_tf_distribute_flag(gpu_check_runs, tmp_path):
    # the mixed precision training is gpu_check's second run (kvae.fit with mixed_precision under
    # JAX, the default model for one epoch)
    folder, result = gpu_check_runs
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    mixed = folder / "runs" / "mixed"
    assert json.loads((mixed / "config.json").read_text())["mixed_precision"] is True
    metrics = json.loads((mixed / "metrics.json").read_text())
    assert np.isfinite(metrics["eval"]["nll"]) and np.isfinite(metrics["final"]["loss"]), metrics
    bad = subprocess.run([str(JAX_PYTHON), "-m", "kvae.fit", "--out", str(tmp_path / "m"),
                          "--strategy", "mirrored", "--epochs", "1"], env=jax_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "TensorFlow backend" in bad.stderr
    assert not (tmp_path / "m").exists()  # refused before writing anything


def test_gpu_check_script_runs_and_checks(gpu_check_runs):
    """bench/gpu_check.sh end to end on the CPU (--allow-cpu), in the JAX environment."""
    tmp_path, result = gpu_check_runs
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check-cpu.json").read_text())
    assert report["passed"] and report["backend"] == "jax"
    assert [r["precision"] for r in report["runs"]] == ["float32", "mixed_float16"]
    assert all(r["samples_per_s"] > 0 and r["eval_k"] == 10 for r in report["runs"])
    assert "reloaded vs trained" in result.stdout and result.stdout.rstrip().splitlines()[-1].startswith("PASS")
    # the check compares the files with the model it is given, the trained one: a model that
    # differs from the saved files (as a save of the wrong weights would) is a problem per output
    probe = jax("-c", CHECK_AGAINST_CHANGED_MODEL, str(ROOT / "bench" / "gpu_check.py"),
                str(tmp_path / "runs" / "float32"))
    problems = json.loads(probe.stdout.strip().splitlines()[-1])
    for output in ("vae.keras loc", "vae.keras scale", "vae.keras x_mean", "encoder.keras loc",
                   "encoder.keras scale", "decoder.keras x_mean"):
        assert any(p.startswith(output + " differs") for p in problems), (output, problems)
    # a check that finds a problem fails: an NLL bound no run can meet, on the mixed precision run
    # above (--check-runs: the same checks and the same verdict, without training it again)
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--check-runs",
                          str(tmp_path / "runs" / "mixed"), "--max-nll", "1",
                          "--results", str(tmp_path / "bad")],
                         env={**jax_env(), "PYTHON": str(JAX_PYTHON)}, capture_output=True, text=True,
                         timeout=900)
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert bad.stdout.count("reloaded vs vae.keras") == 3  # its files were checked
    # the NLL is the one problem found, read from the run's metrics.json
    nll = report["runs"][1]["held_out_nll"]
    assert bad.stdout.rstrip().splitlines()[-1].startswith(f"FAIL: mixed_float16 NLL is {nll} ("), \
        bad.stdout[-2000:]
    assert not (tmp_path / "bad").exists()  # nothing timed, no results file
