"""Shared fixtures: small trained runs, reused by the model, export, runtime and evaluation tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ARTIFACTS = Path(__file__).parent / "artifacts"  # screenshots and other things worth looking at


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """Returns train(arch="conv", **overrides) -> run folder; each distinct run trains once.

    A few epochs on mnist-5k with a small model: enough for real digits and real parity numbers.
    """
    cache: dict = {}

    def train(arch: str = "conv", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            from kvae.config import Config
            from kvae.fit import fit

            out = tmp_path_factory.mktemp(f"run-{arch}")
            # lr 1e-3 without warm-up: the gentler setting the export bounds were measured on
            values = dict(arch=arch, epochs=2, latent_dim=8, hidden=64, eval_k=10, out=str(out),
                          lr=1e-3, kl_warmup=0, batch_size=128)
            values.update(overrides)
            fit(Config(**values))
            cache[key] = out
        return cache[key]

    return train


@pytest.fixture(scope="session")
def exported_run(trained_run):
    """Returns export(arch="conv", **overrides) -> run folder with every file exported into RUN/export.

    Exports once per run: whichever test file asks first exports, the others reuse the files.
    """

    def export_all(arch: str = "conv", **overrides) -> Path:
        import json

        from kvae import contract, export, export_onnx, export_tflite

        run = trained_run(arch, **overrides)
        manifest = run / "export" / "manifest.json"
        for fmt, export_fn in (("tflite", export_tflite.export_tflite), ("onnx", export_onnx.export_onnx)):
            names = {contract.filename(h, p, fmt) for h in contract.HALVES for p in contract.PRECISIONS}
            listed = json.loads(manifest.read_text())["files"] if manifest.exists() else {}
            if not all(n in listed and (run / "export" / n).exists() for n in names):
                export_fn(export.load_run(run))
        return run

    return export_all


@pytest.fixture(scope="session")
def direct():
    """Returns direct(path, signature=None, xnnpack=True) -> call(**inputs) -> outputs by name.

    The model file run by its own runtime (onnxruntime, or one LiteRT signature runner), with none
    of kvae.runtime's code: the oracle that the runtime's planning, padding and chunking must
    reproduce.
    """
    import numpy as np

    def open_file(path, signature: str | None = None, xnnpack: bool = True):
        path = Path(path)
        if path.suffix == ".onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            return lambda **inputs: dict(zip(names, session.run(names, inputs)))
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = (OpResolverType.AUTO if xnnpack
                    else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=resolver)
        runner = interpreter.get_signature_runner(signature or "serving_default")
        return lambda **inputs: {k: np.array(v) for k, v in runner(**inputs).items()}

    return open_file


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> str:
    """mnist-5k's first 500 digits (no labels) as an .npz: 436 train / 64 held out with
    --val-size 64, so 6 steps an epoch at --batch-size 64."""
    import numpy as np

    from kvae.data import _mnist_5k

    x, _ = _mnist_5k()
    path = tmp_path_factory.mktemp("digits-500") / "small.npz"
    np.savez(path, x=x[:500, :, :, 0])
    return str(path)


class BackgroundFit:
    """`python -m kvae.fit` started in the background; `done()` waits for it."""

    def __init__(self, args: list[str], out: Path):
        import subprocess
        import sys

        self.args, self.out = args, out
        self.log = out.parent / "fit.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvae.fit", *args, "--out", str(out)],
                                         cwd=Path(__file__).resolve().parents[1], stdout=log,
                                         stderr=subprocess.STDOUT, text=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def done(self) -> tuple[Path, int, str]:
        """(run folder, exit status, stdout and stderr) once the fit has ended."""
        code = self.proc.wait(timeout=900)  # a safety net for a hung child, not a speed goal
        return self.out, code, self.log.read_text()


@pytest.fixture(scope="session")
def uninterrupted_run(digits_npz, tmp_path_factory):
    """The uninterrupted run that killed-and-resumed ones must equal (tests/test_crash_safety.py,
    tests/test_fit.py), trained once: `python -m kvae.fit` on digits_npz for 6 epochs, conv,
    latent 4, hidden 32, batch 64, eval k 5. Returns a BackgroundFit: its `.args` (kvae.fit's
    arguments but --out, for the runs compared with it) and `.done()`. It starts when first asked
    for and trains alongside that test's own children."""
    args = ["--dataset", digits_npz, "--epochs", "6", "--latent-dim", "4", "--hidden", "32",
            "--batch-size", "64", "--val-size", "64", "--eval-k", "5"]
    fit = BackgroundFit(args, tmp_path_factory.mktemp("uninterrupted") / "run")
    yield fit
    if fit.proc.poll() is None:
        fit.proc.kill()
        fit.proc.wait()
