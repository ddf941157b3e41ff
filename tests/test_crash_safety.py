"""Crash safety: SIGKILL at random points loses nothing.

- `python -m kvae.fit` killed three times (during training, right after a random epoch began; in
  the middle of writing an epoch's weights; while it writes one of the final models, chosen at
  random), then `--resume`: the run completes, history.csv has every epoch exactly once, and the
  final weights equal an uninterrupted run's (CPU, same seed).
- `export/to_onnx.py` and `export/to_tflite.py` killed mid-export (in the middle of writing a file;
  right after a random one of its first files): no partial file under a final name, and a rerun
  produces a complete export folder whose files match the manifest and run.

Every kill waits for an event, not for a time: a line the child prints, or a child stopped in the
middle of a write (tests/children.py), so a fast or a slow machine kills at the same points.

Every artifact is written to a temporary name in its folder and renamed (kvae.files.atomic_path);
a killed writer's `.tmp-<pid>-*` leftovers are removed by the next run in that folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from children import Child

EPOCHS = 6
SEED = int(os.environ.get("KVAE_CRASH_SEED", "2024"))  # seeds the kill points (printed on failure)


def paused_file(child: Child) -> Path | None:
    """Waits for the child to pause half-way through a write; the half-written temporary file."""
    line = child.wait_for_line("PAUSED ")
    return Path(line.split("PAUSED ", 1)[1]) if line else None


def half_written(tmp: Path | None) -> bool:
    """True if the paused write left its temporary file (not yet renamed) on disk."""
    return tmp is not None and tmp.name.startswith(".tmp-") and tmp.is_file()


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


@pytest.mark.slow
def test_fit_killed_three_times_then_resumed_equals_an_uninterrupted_run(uninterrupted_run, tmp_path):
    rng = random.Random(SEED)
    # the reference (conftest's uninterrupted_run: 500 real digits, 436 train / 64 held out, short
    # epochs) trains alongside the killed one; the killed one runs with the same arguments
    args = ["-m", "kvae.fit", *uninterrupted_run.args]
    assert args[args.index("--epochs") + 1] == str(EPOCHS)
    killed = tmp_path / "killed"

    # The kill points: (what the child runs, when it is killed, how to get there). Each waits for
    # an event (a line the child prints), never for a time: the same kills on any machine.
    epoch = rng.randint(2, EPOCHS - 1)
    plan = [
        ("start", f"right after epoch {epoch} began (training)",
         dict(), lambda c: c.wait_for_line(f"Epoch {epoch}/") is not None),
        ("resume", "in the middle of writing an epoch's weights",
         dict(KVAE_TEST_PAUSE_AT="epoch-*.weights.h5:1"), lambda c: half_written(paused_file(c))),
        ("resume", "while it writes the final models",
         dict(KVAE_TEST_PAUSE_AT=f"*.keras:{rng.randint(1, 3)}"), lambda c: half_written(paused_file(c))),
    ]
    log = []
    for how, when, options, trigger in plan:
        child = Child([*args, "--out", str(killed), *(["--resume"] if how == "resume" else [])],
                      **options)
        triggered = trigger(child)
        done_before = epochs_done(killed)
        happened = triggered and child.kill()
        log.append(f"{when}: {'killed' if happened else 'missed'} after epoch {done_before} "
                   f"(temporary files: {[p.name for p in temporary_files(killed)]})")
        assert happened, f"kvae.fit ended before the kill ({when}):\n{child.output()}"
        # whatever the moment, every file under a final name is complete
        if (killed / "history.csv").exists():
            rows = (killed / "history.csv").read_text().splitlines()
            assert rows[0].startswith("epoch,") and all(r.count(",") == rows[0].count(",") for r in rows)
        if (killed / "state" / "progress.json").exists():
            json.loads((killed / "state" / "progress.json").read_text())
    message = f"seed {SEED}; " + "; ".join(log)
    assert epochs_done(killed) == EPOCHS, message  # the last kill came after the last epoch

    final = Child([*args, "--out", str(killed), "--resume"])
    assert final.finish() == 0, final.output()
    straight, code, output = uninterrupted_run.done()
    assert code == 0, output[-3000:]

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
    """A copy of the conv test run's config, Keras files and learned prior (no export/)."""
    source = trained_run("conv")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "vae.keras", "encoder.keras", "decoder.keras", "prior.json"):
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
    ("export/to_tflite.py", "right after a random one of its first files"),
])
def test_export_killed_then_rerun_is_complete(run_copy, script, when):
    rng = random.Random(SEED)
    export = run_copy / "export"
    args = [script, str(run_copy), "--quantize", "fp16"]
    if when.startswith("in the middle"):
        child = Child(args, KVAE_TEST_PAUSE_AT=f"*.{'onnx' if script.endswith('onnx.py') else 'tflite'}:1")
        triggered = half_written(paused_file(child))
    else:  # right after a random one of the first three of its four files
        child = Child(args)
        triggered = child.wait_for_line("kvae.export: wrote", count=rng.randint(1, 3)) is not None
    assert triggered and child.kill(), f"the export ended before it could be killed:\n{child.output()}"
    leftovers = [p.name for p in temporary_files(export)]
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
