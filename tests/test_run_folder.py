"""One writer per run folder, polite stops, damaged resume state (issue #18).

Real processes, real signals, real concurrency:
- Two fits on one folder: the second (new or `--resume`) exits 2 at once naming the first's pid,
  and so do an export and an evaluation of it, all without writing anything; a SIGKILL of the
  holder leaves no stale lock (`--resume` then trains).
- SIGINT / SIGTERM in the middle of an epoch: one line `interrupted after epoch N of M; continue
  with ...`, exit code 130 / 143, the folder exactly as after epoch N (every file hashed when
  epoch N+1 began), and `--resume` ends with every epoch in history.csv once and the weights of an
  uninterrupted run (CPU).
- Exports: a second export of a run waits for the first; a fit and an evaluation refuse it; a
  SIGTERM mid-export (a file half-written under its temporary name) leaves no file under a final
  name that did not pass its self-check, one line, exit code 143, and the waiting export then runs.
- Damaged state: a truncated latest `state/*.weights.h5` resumes from the previous checkpoint (and
  still ends with an uninterrupted run's weights); a truncated progress.json resumes from the
  checkpoint records; with no intact checkpoint, one line and nothing trained.

Every wait is for an event (a line a child prints, a child that pauses at a known point and says
so), never for a time (tests/children.py; its WAIT is only a safety net for a child that hangs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from children import Child, snapshot

EPOCHS = 4


def fit_args(data: str, out: Path, *extra: str) -> list[str]:
    return ["-m", "kvae.fit", "--dataset", data, "--out", str(out), "--epochs", str(EPOCHS),
            "--arch", "mlp", "--latent-dim", "4", "--hidden", "32", "--batch-size", "64",
            "--val-size", "64", "--eval-k", "0", *extra]


def history_epochs(run: Path) -> list[int]:
    return [int(row.split(",")[0]) for row in (run / "history.csv").read_text().splitlines()[1:]]


def h5_arrays(source) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    with h5py.File(source, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None)
    return out


def keras_arrays(path: Path) -> dict[str, np.ndarray]:
    """The weights inside a .keras file (its model.weights.h5), read without Keras."""
    import io

    with zipfile.ZipFile(path) as z:
        return h5_arrays(io.BytesIO(z.read("model.weights.h5")))


def assert_same_weights(run: Path, reference: Path) -> None:
    for a, b in ((h5_arrays(run / "state" / f"epoch-{EPOCHS:04d}.weights.h5"),
                  h5_arrays(reference / "state" / f"epoch-{EPOCHS:04d}.weights.h5")),
                 (keras_arrays(run / "vae.keras"), keras_arrays(reference / "vae.keras"))):
        assert a.keys() == b.keys() and len(a) > 5
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def data(digits_npz) -> str:
    """500 real MNIST digits (436 train / 64 validation): 6 steps an epoch (conftest's)."""
    return digits_npz


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Returns done() -> the folder of an uninterrupted run (trained once, in the background from
    the first test that asks, alongside that test's own children)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    child = Child(fit_args(data, out))
    finished = []

    def done() -> Path:
        if not finished:
            assert child.finish() == 0, child.output()
            finished.append(out)
        return out

    yield done
    if not finished and child.proc.poll() is None:
        child.kill()


# ----------------------------------------------------------------------------------------------
# The lock


def test_one_writer_per_run_folder(data, tmp_path):
    run = tmp_path / "run"
    first = Child(fit_args(data, run), KVAE_TEST_PAUSE_EPOCH="2")
    assert first.wait_for("kvae test: paused in epoch 2"), first.output()
    assert (run / ".kvae-lock").read_text().split()[0] == str(first.pid)  # the pid, for people
    before = snapshot(run)

    others = {
        "a second fit": fit_args(data, run),
        "a second --resume": fit_args(data, run, "--resume"),
        "an export": ["export/to_onnx.py", run, "--quantize", "none"],
        "an evaluation": ["-m", "kvae.evaluate", run, "--k", "2"],
    }
    children = {what: Child(args) for what, args in others.items()}  # all at once, while it trains
    for what, child in children.items():
        assert child.finish() == 2, f"{what}:\n{child.output()}"
        [line] = child.errors()
        assert f"{run} is in use: pid {first.pid} (kvae.fit) is writing it" in line, (what, line)
    assert snapshot(run) == before  # nothing written by the refused ones
    assert not (run / "export").exists()

    # SIGKILL: the OS drops the lock; the file it leaves is not a stale lock
    first.kill()
    assert (run / ".kvae-lock").exists()
    resumed = Child(fit_args(data, run, "--resume"))
    assert resumed.finish() == 0, resumed.output()
    assert resumed.wait_for(f"resuming {run} after epoch 1")
    assert history_epochs(run) == list(range(1, EPOCHS + 1))
    assert not (run / ".kvae-lock").exists() and not list(run.rglob(".tmp-*"))


# ----------------------------------------------------------------------------------------------
# SIGINT / SIGTERM during a fit


@pytest.mark.parametrize("signum, when", [
    (signal.SIGINT, "paused after the first step of epoch 3"),
    (signal.SIGTERM, "as soon as epoch 2 began (in its steps)"),
])
def test_interrupted_fit_stops_politely_and_resumes(data, reference, tmp_path, signum, when):
    run, snapshots = tmp_path / "run", tmp_path / "snapshots"
    snapshots.mkdir()
    if signum == signal.SIGINT:
        child = Child(fit_args(data, run), KVAE_TEST_PAUSE_EPOCH="3", KVAE_TEST_SNAPSHOTS=str(snapshots))
        assert child.wait_for("kvae test: paused in epoch 3"), child.output()
    else:
        child = Child(fit_args(data, run), KVAE_TEST_SNAPSHOTS=str(snapshots))
        assert child.wait_for(f"Epoch 2/{EPOCHS}"), child.output()
    sent = time.monotonic()
    child.signal(signum)
    assert child.finish() == 128 + signum, child.output()
    seconds = time.monotonic() - sent
    [line] = child.errors()
    match = re.fullmatch(rf"kvae\.fit: interrupted after epoch (\d) of {EPOCHS}; continue with "
                         rf"python -m kvae\.fit --resume --out (\S+)", line)
    assert match and match.group(2) == str(run), line
    done = int(match.group(1))
    print(f"{signal.Signals(signum).name} {when}: stopped after epoch {done}, exited {seconds:.1f} s "
          "after the signal")
    if signum == signal.SIGINT:
        assert done == 2
    assert 1 <= done < EPOCHS, f"{when}: the signal came too late to test anything:\n{child.output()}"
    assert json.loads((run / "state" / "progress.json").read_text())["epochs_done"] == done
    # exactly as after epoch `done`: every file (but the TensorBoard logs) as it was then
    assert snapshot(run) == json.loads((snapshots / f"after-{done}.json").read_text())
    assert not (run / ".kvae-lock").exists()

    resumed = Child(fit_args(data, run, "--resume"))
    assert resumed.finish() == 0, resumed.output()
    assert history_epochs(run) == list(range(1, EPOCHS + 1))  # every epoch exactly once
    assert_same_weights(run, reference())


def test_a_signal_during_an_epoch_commit_waits_for_the_commit(tmp_path):
    """SIGTERM arriving while an epoch's weights are being written: the commit finishes (record,
    history, progress.json), then the interruption comes (a real signal, sent to this process)."""
    from kvae.callbacks import RunState
    from kvae.config import Config
    from kvae.errors import Interrupted, signals_interrupt

    class Model:  # what RunState touches of a VAE
        stop_training = False

        def save_weights(self, path):
            os.kill(os.getpid(), signal.SIGTERM)  # mid-write
            Path(path).write_bytes(b"weights")

    state = RunState(tmp_path, Config())
    state.set_model(Model())
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e, signals_interrupt():
        state.on_epoch_end(0, {"loss": 1.0, "val_loss": 2.0})
    assert e.value.signum == signal.SIGTERM
    assert json.loads((tmp_path / "state" / "progress.json").read_text())["epochs_done"] == 1
    assert json.loads((tmp_path / "state" / "epoch-0001.json").read_text())["weights"] == {
        "epoch-0001.weights.h5": hashlib.sha256(b"weights").hexdigest()}
    assert history_epochs(tmp_path) == [1]
    assert signal.getsignal(signal.SIGTERM) == before  # put back


# ----------------------------------------------------------------------------------------------
# Exports


def test_exports_wait_for_each_other_refuse_a_fit_and_stop_cleanly(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference(), run, ignore=shutil.ignore_patterns("logs"))
    export = run / "export"
    first = Child(["export/to_onnx.py", run, "--quantize", "none"], KVAE_TEST_PAUSE_AT="*.onnx:1")
    paused = first.wait_for("PAUSED ")
    assert paused, first.output()
    half_written = Path(paused.split("PAUSED ", 1)[1])
    assert half_written.is_file() and not (export / half_written.name.split("-")[-1]).exists()

    for args in (["-m", "kvae.fit", "--resume", "--out", run], ["-m", "kvae.evaluate", run, "--k", "2"]):
        refused = Child(args)
        assert refused.finish() == 2, refused.output()
        [line] = refused.errors()
        assert f"{run} is in use: pid {first.pid} (export/to_onnx.py) is writing it" in line, line
    second = Child(["export/to_tflite.py", run, "--quantize", "none"])
    assert second.wait_for(f"waiting for the export that pid {first.pid} (export/to_onnx.py) runs"), \
        second.output()

    first.signal(signal.SIGTERM)
    assert first.finish() == 143, first.output()
    [line] = first.errors()
    assert line.startswith("export/to_onnx.py: interrupted; the files under final names in"), line
    assert not half_written.exists()
    assert not list(export.glob("*.onnx")), "a file that never passed its self-check has a final name"

    assert second.finish() == 0, second.output()  # it ran once the first had ended
    manifest = json.loads((export / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["decoder.tflite", "encoder.tflite"]
    assert not list(export.glob(".tmp-*")) and not (run / ".kvae-lock").exists()


# ----------------------------------------------------------------------------------------------
# Damaged resume state


def test_resume_falls_back_from_a_truncated_latest_checkpoint(reference, tmp_path):
    source = reference()
    kept = sorted(p.name for p in (source / "state").iterdir())
    assert {f"epoch-{e:04d}.{ext}" for e in (EPOCHS - 1, EPOCHS) for ext in ("json", "weights.h5")} \
        <= set(kept) and len([k for k in kept if k.endswith(".json")]) == 3, kept  # 2 records + progress

    run = tmp_path / "run"
    shutil.copytree(source, run)
    truncate(run / "state" / f"epoch-{EPOCHS:04d}.weights.h5")
    resumed = Child(["-m", "kvae.fit", "--resume", "--out", run])
    assert resumed.finish() == 0, resumed.output()
    assert resumed.wait_for(f"state/epoch-{EPOCHS:04d}.weights.h5 is damaged (truncated or changed"), \
        resumed.output()
    assert resumed.wait_for(f"resuming from the newest intact checkpoint: epoch {EPOCHS - 1}")
    assert resumed.wait_for(f"Epoch {EPOCHS}/{EPOCHS}")  # trained again
    assert history_epochs(run) == list(range(1, EPOCHS + 1))
    assert_same_weights(run, source)


@pytest.mark.parametrize("case", ["progress.json", "latest two weights", "every record"])
def test_resume_with_damaged_state(reference, tmp_path, capsys, case):
    from kvae.fit import main

    run = tmp_path / "run"
    shutil.copytree(reference(), run, ignore=shutil.ignore_patterns("logs"))
    state = run / "state"
    if case == "progress.json":
        truncate(state / "progress.json")
    elif case == "latest two weights":
        for epoch in (EPOCHS - 1, EPOCHS):
            truncate(state / f"epoch-{epoch:04d}.weights.h5")
    else:
        for path in state.glob("*.json"):
            truncate(path)
    before = snapshot(run)
    if case == "progress.json":  # the checkpoint records still name epoch 4
        main(["--resume", "--out", str(run)])
        out = capsys.readouterr().out
        assert "state/progress.json is damaged (truncated or unreadable" in out, out
        assert f"resuming from the newest intact checkpoint: epoch {EPOCHS}" in out
        assert f"already finished {EPOCHS} epochs" in out
        assert json.loads((state / "progress.json").read_text())["epochs_done"] == EPOCHS
        assert history_epochs(run) == list(range(1, EPOCHS + 1))
        return
    with pytest.raises(SystemExit) as e:
        main(["--resume", "--out", str(run)])
    assert e.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"kvae.fit: error: --resume: the resume state in {state} is damaged: "), line
    assert "is damaged" in line and "start it again" in line
    if case == "latest two weights":
        assert f"epoch-{EPOCHS:04d}.weights.h5 is damaged" in line
    after = snapshot(run)
    assert after.pop("config.json") and before.pop("config.json")  # its "out" is now this copy
    assert after == before  # nothing trained, nothing rewritten
