"""Crash safety: SIGKILL at random points loses nothing.

- `python -m kvae.fit` killed three times (at a random moment of training, in the middle of writing
  an epoch's weights, and while it writes the final models), then `--resume`: the run completes,
  history.csv has every epoch exactly once, and the final weights equal an uninterrupted run's
  (CPU, same seed).
- `export/to_onnx.py` and `export/to_tflite.py` killed mid-export: no partial file under a final
  name, and a rerun produces a complete export folder whose files match the manifest and run.

Every artifact is written to a temporary name in its folder and renamed (kvae.files.atomic_path);
a killed writer's `.tmp-<pid>-*` leftovers are removed by the next run in that folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6
SEED = int(os.environ.get("KVAE_CRASH_SEED", "2024"))  # seeds the kill points (printed on failure)


class Child:
    """A `python ...` child process whose stdout lines are collected as they come."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> bool:
        """SIGKILL now; True if it was still running (the kill happened)."""
        alive = self.running()
        if alive:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=10)
        return alive

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def output(self) -> str:
        return "\n".join(self.lines[-40:])


def wait_until(condition, child: Child, timeout: float = 240, poll: float = 0.002) -> bool:
    """Polls `condition` until it holds (True) or the child exits / time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not child.running():
            return condition()
        time.sleep(poll)
    return False


def temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".tmp-*")] if folder.exists() else []


def epochs_done(run: Path) -> int:
    try:
        return json.loads((run / "state" / "progress.json").read_text())["epochs_done"]
    except (OSError, ValueError, KeyError):
        return 0


def h5_weights(path: Path) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None)
    return out


def keras_weights(path: Path) -> list[np.ndarray]:
    from kvae.model import load_vae

    return [np.asarray(w) for w in load_vae(path).weights]


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> str:
    """500 real MNIST digits: 436 train / 64 held out, short epochs."""
    from kvae.data import _mnist_5k

    x, _ = _mnist_5k()
    path = tmp_path_factory.mktemp("crash-data") / "small.npz"
    np.savez(path, x=x[:500, :, :, 0])
    return str(path)


@pytest.mark.slow
def test_fit_killed_three_times_then_resumed_equals_an_uninterrupted_run(small_npz, tmp_path):
    rng = random.Random(SEED)
    args = ["-m", "kvae.fit", "--dataset", small_npz, "--epochs", str(EPOCHS), "--latent-dim", "4",
            "--hidden", "32", "--batch-size", "64", "--val-size", "64", "--eval-k", "5"]
    straight = tmp_path / "straight"
    killed = tmp_path / "killed"
    reference = Child([*args, "--out", str(straight)])  # runs alongside the killed one

    # The kill points: (what the child runs, when it is killed)
    plan = [
        ("start", "a random moment of training",
         lambda c: wait_until(lambda: c.saw("Epoch 2/"), c) and (time.sleep(rng.uniform(0, 1.5)) or True)),
        ("resume", "in the middle of writing an epoch's weights",
         lambda c: wait_until(lambda: any(p.name.endswith(".weights.h5") for p in temporary_files(killed)),
                              c, poll=0.0005)),
        ("resume", "while it writes the final models",
         lambda c: wait_until(lambda: epochs_done(killed) == EPOCHS, c)
         and (time.sleep(rng.uniform(0, 0.8)) or True)),
    ]
    log = []
    for how, when, trigger in plan:
        child = Child([*args, "--out", str(killed), *(["--resume"] if how == "resume" else [])])
        triggered = trigger(child)
        done_before = epochs_done(killed)
        happened = triggered and child.kill()
        log.append(f"{when}: {'killed' if happened else 'missed'} after epoch {done_before} "
                   f"(temporary files: {[p.name for p in temporary_files(killed)]})")
        if not happened and child.proc.returncode not in (0, -signal.SIGKILL):
            pytest.fail(f"kvae.fit failed before the kill ({when}):\n{child.output()}")
        # whatever the moment, every file under a final name is complete
        if (killed / "history.csv").exists():
            rows = (killed / "history.csv").read_text().splitlines()
            assert rows[0].startswith("epoch,") and all(r.count(",") == rows[0].count(",") for r in rows)
        if (killed / "state" / "progress.json").exists():
            json.loads((killed / "state" / "progress.json").read_text())
    message = f"seed {SEED}; " + "; ".join(log)
    assert sum("killed" in entry for entry in log) >= 2, message

    final = Child([*args, "--out", str(killed), "--resume"])
    assert final.finish() == 0, final.output()
    assert reference.finish() == 0, reference.output()

    epochs = [r.split(",")[0] for r in (killed / "history.csv").read_text().splitlines()[1:]]
    assert epochs == [str(e) for e in range(1, EPOCHS + 1)], message  # every epoch exactly once
    a = h5_weights(straight / "state" / f"epoch-{EPOCHS:04d}.weights.h5")
    b = h5_weights(killed / "state" / f"epoch-{EPOCHS:04d}.weights.h5")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=f"{name}; {message}")
    for w_a, w_b in zip(keras_weights(straight / "vae.keras"), keras_weights(killed / "vae.keras")):
        np.testing.assert_allclose(w_a, w_b, rtol=1e-5, atol=1e-6, err_msg=message)
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["epochs"] == EPOCHS and metrics["eval"]["k"] == 5
    assert not temporary_files(killed), f"leftovers after the resume: {temporary_files(killed)}; {message}"
    print(message)


# ----------------------------------------------------------------------------------------------
# Export


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A copy of the conv test run's config and Keras files (no export/)."""
    source = trained_run("conv")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "vae.keras", "encoder.keras", "decoder.keras"):
        shutil.copy(source / name, run / name)
    return run


def check_final_names(export: Path) -> list[str]:
    """Every model file under its final name is complete: it loads and decodes/encodes in its
    runtime; entries in the manifest match their files. Returns the file names."""
    from kvae.runtime import Decoder, Encoder, RuntimeInputError

    names = sorted(p.name for p in export.iterdir()
                   if p.suffix in (".onnx", ".tflite") and not p.name.startswith("."))
    path = export / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        half = Decoder if name.startswith("decoder") else Encoder
        try:
            model = half(export / name, verify=name in manifest.get("files", {}))
        except RuntimeInputError as e:
            pytest.fail(f"a partial or stale file under a final name: {e}")
        if half is Decoder:
            assert np.isfinite(model.decode(np.zeros((2, model.latent_dim), np.float32))).all()
        else:
            assert np.isfinite(model.encode(np.zeros((2, *model.image_shape), np.float32))[0]).all()
    return names


@pytest.mark.slow
@pytest.mark.parametrize("script, when", [
    ("export/to_onnx.py", "in the middle of writing a file"),
    ("export/to_tflite.py", "a random moment after the first file"),
])
def test_export_killed_then_rerun_is_complete(run_copy, script, when):
    rng = random.Random(SEED)
    export = run_copy / "export"
    args = [script, str(run_copy), "--quantize", "fp16"]
    child = Child(args)
    if when.startswith("in the middle"):
        triggered = wait_until(lambda: bool(temporary_files(export)), child, poll=0.0005)
    else:
        triggered = wait_until(lambda: child.saw("kvae.export: wrote"), child) and (
            time.sleep(rng.uniform(0, 3)) or True)
    leftovers = [p.name for p in temporary_files(export)]
    assert triggered and child.kill(), f"the export ended before it could be killed:\n{child.output()}"
    written = check_final_names(export)  # only complete files survive under final names
    print(f"{script} killed {when}: final names {written}, temporary files {leftovers}")

    rerun = Child(args)
    assert rerun.finish() == 0, rerun.output()
    fmt = "onnx" if script.endswith("onnx.py") else "tflite"
    expected = sorted(f"{half}{precision}.{fmt}" for half in ("encoder", "decoder")
                      for precision in ("", ".fp16"))
    assert check_final_names(export) == expected
    manifest = json.loads((export / "manifest.json").read_text())
    assert sorted(manifest["files"]) == expected
    assert not temporary_files(export), temporary_files(export)
