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
