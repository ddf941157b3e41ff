"""Bad input ends well: ONE line on stderr that says what was wrong and what to do, a non-zero
exit, no traceback, and no half-written file under a final name.

One parametrized matrix over every tool a user runs: `python -m kvae.fit`, `python -m
kvae.evaluate`, `export/to_tflite.py`, `export/to_onnx.py`, the TensorFlow-free runtime (the
`kvae.runtime` API and `python -m kvae.sample` / `kvae.encode`) and `python -m kvae.demo`.

Most cases call the tool's `main([...])` in this process (stderr is what a shell would show from
Python); the `shell` cases run real subprocesses to prove that nothing reaches the shell as a
traceback. A full disk is simulated two ways: a write that stores half its bytes and then fails
with ENOSPC (in-process fault injection), and RLIMIT_FSIZE in a subprocess (the kernel refuses
writes past N bytes with EFBIG, as it does at a quota). Runtime API cases assert the documented
`RuntimeInputError` (any other exception fails the test) and render it as the CLIs do.

Not counted as error output: TensorFlow's own C++ start-up log lines in subprocesses that import
it (absl logging prints them before Python can silence them, on every run, failed or not).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib.util
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TF_LOG = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] |WARNING: All log messages "
                    r"before absl::InitializeLog\(\) is called are written to STDERR$)")


# ----------------------------------------------------------------------------------------------
# Fixtures: one trained run (conftest), exported once; small inputs built per case


@pytest.fixture(scope="session")
def exported(exported_run) -> Path:
    """The conv test run with every file exported (shared with test_runtime / test_export: whichever
    runs first exports, the others reuse it). Cases only read it."""
    return exported_run("conv")


class Ctx:
    """What a case builds its bad input from: a scratch folder and the exported run (read-only)."""

    def __init__(self, tmp: Path, run: Path):
        self.tmp, self.run = tmp, run

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def copy_run(self, name: str = "run", export: bool = False) -> Path:
        """A copy of the run folder (models, config, state), optionally with its export/."""
        target = self.tmp / name
        shutil.copytree(self.run, target, ignore=shutil.ignore_patterns(
            "logs", *(() if export else ("export",))))
        return target

    def npz(self, name: str, **arrays) -> str:
        np.savez(self.tmp / name, **arrays)
        return self.path(name)

    def folder(self, name: str, files: dict[str, object]) -> str:
        """A folder of files: np.ndarray values become PNG images, str values text files."""
        from PIL import Image

        folder = self.tmp / name
        folder.mkdir()
        for file, content in files.items():
            if isinstance(content, np.ndarray):
                Image.fromarray(content).save(folder / file)
            else:
                (folder / file).write_text(content)
        return str(folder)

    def export_copy(self, *names: str) -> Path:
        """A folder holding copies of some exported files (and the manifest)."""
        folder = self.tmp / "exported"
        folder.mkdir(exist_ok=True)
        for name in (*names, "manifest.json"):
            shutil.copy(self.run / "export" / name, folder / name)
        return folder


def half_written_then_enospc(monkeypatch):
    """Every Path.write_bytes stores half of its bytes, then fails as a full disk does."""
    real = Path.write_bytes

    def write_bytes(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def unreadable(monkeypatch):
    """Files named locked.* cannot be opened (as without read permission, which root ignores)."""
    import builtins

    from kvae import data

    def locked_open(file, *args, **kwargs):
        if Path(file).name.startswith("locked."):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(data, "open", locked_open, raising=False)


def offline(monkeypatch):
    from kvae import data

    monkeypatch.setattr(data, "_online", lambda *a, **k: False)


def demo_without_npm(monkeypatch, app: Path):
    """The demo cases do not depend on `npm ci`: a stand-in web app folder; and a case that wrongly
    starts serving fails instead of hanging."""
    from kvae import demo

    (app / demo.ORT_DIST).mkdir(parents=True, exist_ok=True)
    (app / "index.html").write_text("<!doctype html>")
    (app / demo.ORT_DIST / demo.ORT_ENTRY).write_text("export {};")
    real = demo.check_folders
    monkeypatch.setattr(demo, "check_folders", lambda run, app_dir=None: real(run, app))

    def serve_forever(self, *a, **k):
        raise AssertionError("the demo started serving instead of refusing the input")

    monkeypatch.setattr(demo.DemoServer, "serve_forever", serve_forever)


def keras_zip_with(config: str, name: str = "vae.keras"):
    def make(run: Path):
        with zipfile.ZipFile(run / name, "w") as z:
            z.writestr("metadata.json", '{"keras_version": "3.15.1"}')
            z.writestr("config.json", config)
            z.writestr("model.weights.h5", b"not hdf5")
    return make


def lambda_model(path: Path) -> None:
    """A .keras file whose Lambda layer would run arbitrary Python code when loaded unsafely."""
    import keras

    x = keras.Input((28, 28, 1), name="x")
    keras.Model(x, keras.layers.Lambda(lambda t: t * 2)(x)).save(path)


def truncate(path: Path, keep: float = 0.3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ----------------------------------------------------------------------------------------------
# The matrix


@dataclasses.dataclass
class Case:
    id: str
    tool: str  # fit | evaluate | to_tflite | to_onnx | runtime | sample | encode | demo
    make: Callable  # Ctx -> argv (a list), or for `runtime` a function that calls the API
    wrong: str  # regex: what was wrong
    todo: str | None = None  # regex: what to do (None: the "what was wrong" says it)
    fault: Callable | None = None  # monkeypatch -> None, applied before the call
    allowed_new: tuple[str, ...] = ()  # globs (relative to the scratch folder) that may appear
    slow: bool = False


def _decoder_with_latent_16(c: Ctx) -> Path:
    folder = c.export_copy("decoder.onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["latent_dim"] = 16
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "decoder.onnx"


def _changed_decoder(c: Ctx) -> Path:
    folder = c.export_copy("decoder.onnx")
    data = bytearray((folder / "decoder.onnx").read_bytes())
    data[-100] ^= 0xFF  # one weight byte: still a valid model, only the sha256 can tell
    (folder / "decoder.onnx").write_bytes(bytes(data))
    return folder / "decoder.onnx"


def api(call: Callable, prepare: Callable = lambda c: c.run):
    """A runtime case: make(c) builds the input now (before the snapshot) and returns the call."""
    return lambda c: functools.partial(call, prepare(c))


def _dataset_moved(c: Ctx) -> str:
    run = c.copy_run()
    config = json.loads((run / "config.json").read_text())
    config["dataset"] = c.path("moved.npz")
    (run / "config.json").write_text(json.dumps(config))
    return str(run)


def _existing_run(c: Ctx) -> str:
    run = c.tmp / "existing"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"latent_dim": 4}))
    return str(run)


def _run_with(c: Ctx, change: Callable[[Path], None], export: bool = False) -> str:
    run = c.copy_run(export=export)
    change(run)
    return str(run)


def _bound_port(c: Ctx) -> int:
    c.listener = socket.socket()
    c.listener.bind(("127.0.0.1", 0))
    c.listener.listen()
    return c.listener.getsockname()[1]


def _small_png(c: Ctx) -> str:
    return c.folder("small", {"a.png": np.zeros((20, 20), np.uint8)}) + "/a.png"


IMAGE = np.zeros((28, 28), np.uint8)
FIT_OUT = ["--out", "{tmp}/out"]  # fit cases write (nothing) here

CASES = [
    # --- python -m kvae.fit ---------------------------------------------------------------
    Case("fit-unknown-dataset", "fit", lambda c: ["--dataset", "no_such_dataset_xyz", *FIT_OUT],
         "unknown dataset 'no_such_dataset_xyz'", "use mnist-5k"),
    Case("fit-offline-tfds", "fit", lambda c: ["--dataset", "mnist", "--data-dir", c.path("tfds"), *FIT_OUT],
         "is not in .* network is unreachable", "--dataset mnist-5k", fault=offline),
    Case("fit-missing-npz", "fit", lambda c: ["--dataset", c.path("missing.npz"), *FIT_OUT],
         "no such file"),
    Case("fit-unreadable-npz", "fit", lambda c: ["--dataset", c.npz("locked.npz", x=np.zeros((9, 4, 4))),
                                                 *FIT_OUT], "cannot read .*locked.npz: Permission denied",
         "check its permissions", fault=unreadable),
    Case("fit-empty-folder", "fit", lambda c: ["--dataset", c.folder("empty", {}), *FIT_OUT],
         "no images .* in folder"),
    Case("fit-no-image-files", "fit", lambda c: ["--dataset", c.folder("txt", {"a.txt": "hi", "b.csv": "1,2"}),
                                                 *FIT_OUT], "no images .* in folder"),
    Case("fit-fake-png", "fit", lambda c: ["--dataset", c.folder("fake", {"a.png": IMAGE, "b.png": "text"}),
                                           *FIT_OUT], "cannot read image .*b.png", "remove it"),
    Case("fit-mixed-sizes", "fit",
         lambda c: ["--dataset", c.folder("mixed", {"a.png": IMAGE, "b.png": np.zeros((20, 28), np.uint8)}),
                    *FIT_OUT], "different sizes", "resize them"),
    Case("fit-npz-without-x", "fit", lambda c: ["--dataset", c.npz("d.npz", images=np.zeros((9, 4, 4))),
                                                *FIT_OUT], "no array named 'x'", r"numpy.savez\(path, x="),
    Case("fit-nan-pixels", "fit", lambda c: ["--dataset", c.npz("d.npz", x=np.full((9, 4, 4), np.nan)),
                                             *FIT_OUT], "NaN or infinite", "remove or repair"),
    Case("fit-pixels-out-of-range", "fit", lambda c: ["--dataset", c.npz("d.npz", x=np.full((9, 4, 4), 255.0)),
                                                      *FIT_OUT], r"float pixels in \[255, 255\]",
         r"must lie in \[0, 1\] \(or store uint8"),
    Case("fit-npz-not-a-zip", "fit", lambda c: ["--dataset", c.folder("f", {"d.npz": "x,y\n1,2"}) + "/d.npz",
                                                *FIT_OUT], "not a zip archive", "numpy.savez"),
    Case("fit-npz-wrong-shape", "fit", lambda c: ["--dataset", c.npz("d.npz", x=np.zeros(600)), *FIT_OUT],
         r"'x' must have shape \(N, H, W\)"),
    Case("fit-too-few-examples", "fit", lambda c: ["--dataset", c.npz("d.npz", x=np.zeros((9, 4, 4), np.uint8)),
                                                   *FIT_OUT], "has 9 examples", "--val-size"),
    Case("fit-zero-latent", "fit", lambda c: ["--latent-dim", "0", *FIT_OUT],
         r"--latent-dim must be a positive integer \(got 0\)"),
    Case("fit-negative-batch", "fit", lambda c: ["--batch-size", "-5", *FIT_OUT],
         "--batch-size must be a positive integer"),
    Case("fit-not-a-number", "fit", lambda c: ["--latent-dim", "abc", *FIT_OUT],
         "argument --latent-dim: invalid int value: 'abc'", "--help"),
    Case("fit-unknown-flag", "fit", lambda c: ["--latnet-dim", "3", *FIT_OUT],
         "unrecognized arguments: --latnet-dim", "--help"),
    Case("fit-conflicting-flags", "fit", lambda c: ["--likelihood", "bernoulli", "--binarize", "none", *FIT_OUT],
         "bernoulli needs binary pixels", "--binarize dynamic or static"),
    Case("fit-resume-with-a-change", "fit", lambda c: ["--resume", "--out", _existing_run(c), "--latent-dim", "5"],
         "cannot change --latent-dim", r"only --epochs"),
    Case("fit-existing-run", "fit", lambda c: ["--out", _existing_run(c)], "already holds a run",
         "pass --resume"),
    Case("fit-out-is-a-file", "fit", lambda c: ["--out", c.folder("f", {"a": ""}) + "/a"],
         "is a file, not a folder"),
    Case("fit-out-under-a-file", "fit", lambda c: ["--out", c.folder("f", {"a": ""}) + "/a/run"],
         "cannot write to --out .*Not a directory"),
    Case("fit-bad-config-type", "fit", lambda c: ["--config", c.folder("f", {"c.json": '{"latent_dim": "8"}'})
                                                  + "/c.json", *FIT_OUT], "config key 'latent_dim' must be int"),
    Case("fit-full-disk", "fit", lambda c: ["--dataset", c.npz("d.npz", x=np.zeros((80, 8, 8), np.uint8)),
                                            "--val-size", "16", "--latent-dim", "2", "--hidden", "8",
                                            "--epochs", "1", *FIT_OUT],
         "No space left on device: .*config.json", "free some disk space", fault=half_written_then_enospc),
    Case("fit-model-too-big-for-memory", "fit",
         lambda c: ["--dataset", c.npz("d.npz", x=np.zeros((80, 8, 8), np.uint8)), "--val-size", "16",
                    "--latent-dim", str(10 ** 11), *FIT_OUT],
         r"out of memory: OOM when allocating tensor with shape\[\d+,100000000000\] and type float \(",
         "smaller --batch-size", slow=True),  # TensorFlow waits 10 s for memory before it gives up
    # --- python -m kvae.evaluate ------------------------------------------------------------
    Case("evaluate-not-a-run", "evaluate", lambda c: [c.folder("empty", {})], "is not a run folder",
         "python -m kvae.fit"),
    Case("evaluate-unfinished-run", "evaluate",
         lambda c: [_run_with(c, lambda r: (r / "vae.keras").unlink())], "has no vae.keras", "--resume"),
    Case("evaluate-truncated-keras", "evaluate", lambda c: [_run_with(c, lambda r: truncate(r / "vae.keras"))],
         "not a complete .keras file", r"python -m kvae.fit --resume --out"),
    Case("evaluate-corrupt-keras", "evaluate", lambda c: [_run_with(c, keras_zip_with("{not json"))],
         "cannot load .*vae.keras", "--resume"),
    Case("evaluate-code-in-keras-file", "evaluate", lambda c: [_run_with(c, lambda r: lambda_model(r / "vae.keras"))],
         "cannot load .*vae.keras: ValueError: Requested the deserialization of a `Lambda` layer",
         "--resume"),  # safe_mode=True: never runs code from a file
    Case("evaluate-not-a-vae", "evaluate",
         lambda c: [_run_with(c, lambda r: shutil.copy(r / "decoder.keras", r / "vae.keras"))],
         "holds a Functional .* not a kvae VAE", "--resume"),
    Case("evaluate-zero-k", "evaluate", lambda c: [str(c.run), "--k", "0"], "--k must be a positive integer"),
    Case("evaluate-test-split-of-mnist-5k", "evaluate", lambda c: [str(c.run), "--split", "test"],
         "--split test needs a TFDS dataset", "use --split val"),
    Case("evaluate-other-image-size", "evaluate",
         lambda c: [str(c.run), "--dataset", c.npz("d.npz", x=np.zeros((600, 8, 8), np.uint8)), "--k", "2"],
         r"images are \(8, 8, 1\), the model takes \(28, 28, 1\)", "pass a --dataset of"),
    Case("evaluate-corrupt-config", "evaluate", lambda c: [_run_with(c, lambda r: (r / "config.json").write_text("{"))],
         "cannot read config file"),
    Case("evaluate-corrupt-metrics", "evaluate",
         lambda c: [_run_with(c, lambda r: (r / "metrics.json").write_text('{"eval": '))],
         "cannot read .*metrics.json", "fix it or delete it"),
    Case("evaluate-dataset-moved", "evaluate", lambda c: [_dataset_moved(c)], "no such file: .*moved.npz"),
    Case("evaluate-full-disk", "evaluate", lambda c: [c.copy_run().as_posix(), "--k", "2", "--n", "4"],
         "No space left on device: .*metrics.json", "free some disk space", fault=half_written_then_enospc),
    # --- export/to_tflite.py and export/to_onnx.py ------------------------------------------
    Case("tflite-no-such-run", "to_tflite", lambda c: [c.path("nope")], "no such run folder",
         "python -m kvae.fit"),
    Case("onnx-not-a-run", "to_onnx", lambda c: [c.folder("empty", {})], "is not a run folder",
         "python -m kvae.fit"),
    Case("tflite-unfinished-run", "to_tflite",
         lambda c: [_run_with(c, lambda r: (r / "encoder.keras").unlink())], "has no encoder.keras", "--resume"),
    Case("onnx-truncated-keras", "to_onnx", lambda c: [_run_with(c, lambda r: truncate(r / "decoder.keras"))],
         "decoder.keras is not a complete .keras file", "--resume"),
    Case("onnx-corrupt-keras", "to_onnx",
         lambda c: [_run_with(c, keras_zip_with('{"class_name": "Nope"}', "encoder.keras"))],
         "cannot load .*encoder.keras"),
    Case("tflite-code-in-keras-file", "to_tflite",
         lambda c: [_run_with(c, lambda r: lambda_model(r / "encoder.keras"))],
         "cannot load .*encoder.keras: ValueError: Requested the deserialization of a `Lambda` layer"),
    Case("onnx-out-is-a-file", "to_onnx", lambda c: [str(c.run), "--out", c.folder("f", {"a": ""}) + "/a"],
         "--out .* is a file, not a folder"),
    Case("onnx-out-under-a-file", "to_onnx",
         lambda c: [str(c.run), "--out", c.folder("f", {"a": ""}) + "/a/export", "--quantize", "none"],
         "cannot write to .*Not a directory", "a part of the path is a file"),
    Case("tflite-zero-fixed-batch", "to_tflite", lambda c: [str(c.run), "--fixed-batch", "0"],
         "--fixed-batch takes positive batch sizes"),
    Case("onnx-unknown-precision", "to_onnx", lambda c: [str(c.run), "--quantize", "int4"],
         "argument --quantize: invalid choice: 'int4'", "--help"),
    Case("onnx-dataset-moved", "to_onnx", lambda c: [_dataset_moved(c)], "no such file: .*moved.npz"),
    Case("onnx-full-disk", "to_onnx", lambda c: [c.copy_run().as_posix(), "--quantize", "none"],
         "cannot write to .*No space left on device: .*encoder.onnx", "free some disk space",
         fault=half_written_then_enospc),
    # --- the runtime: kvae.runtime API --------------------------------------------------------
    Case("runtime-latent-disagrees-with-manifest", "runtime",
         api(lambda path: runtime().Decoder(path), _decoder_with_latent_16),
         "takes latent size 8 .* manifest.json says 16", "export the run again"),
    Case("runtime-z-wrong-shape", "runtime", api(lambda run: runtime().Decoder(run).decode(np.zeros((2, 7)))),
         r"z must have shape \(batch, 8\)"),
    Case("runtime-z-nan", "runtime", api(lambda run: runtime().Decoder(run).decode(np.full((1, 8), np.nan))),
         "NaN or infinite"),
    Case("runtime-z-strings", "runtime", api(lambda run: runtime().Decoder(run).decode(np.full((1, 8), "0.5"))),
         "real numeric array"),
    Case("runtime-z-ragged", "runtime",
         api(lambda run: runtime().Decoder(run).decode([[0.0] * 8, [0.0] * 7])), "rows of equal length"),
    Case("runtime-images-wrong-shape", "runtime",
         api(lambda run: runtime().Encoder(run).encode(np.zeros((2, 28, 28, 3)))),
         r"images must have shape \(batch, 28, 28, 1\)"),
    Case("runtime-images-0-255-floats", "runtime",
         api(lambda run: runtime().Encoder(run).encode(np.full((1, 28, 28, 1), 255.0))),
         r"float images must lie in \[0, 1\]", "divide 0..255 pixels by 255"),
    Case("runtime-truncated-onnx", "runtime",
         api(lambda path: runtime().Decoder(path), lambda c: _truncated(c, "decoder.onnx")),
         "cannot load .* as an ONNX model", "truncated, corrupt"),
    Case("runtime-corrupt-tflite", "runtime",
         api(lambda path: runtime().Decoder(path), lambda c: _truncated(c, "decoder.tflite", keep=0.05)),
         "cannot load .* as a TFLite model", "truncated, corrupt"),
    Case("runtime-sha256-mismatch", "runtime", api(lambda path: runtime().Decoder(path, verify=True),
                                                   _changed_decoder),
         "does not match its manifest", "export it again"),
    Case("runtime-wrong-half", "runtime", api(lambda run: runtime().Decoder(run / "export" / "encoder.tflite")),
         "is the encoder, not the decoder", "kvae.runtime.Encoder"),
    Case("runtime-bad-seed", "runtime",
         api(lambda run: runtime().VAE.from_folder(run).log_likelihood(np.zeros((1, 28, 28, 1)), k=2, seed=-1)),
         "seed must be a non-negative integer"),
    # --- python -m kvae.sample / kvae.encode ---------------------------------------------------
    Case("sample-not-exported", "sample", lambda c: [_run_with(c, lambda r: None), "--out", c.path("g.png")],
         "has no decoder.onnx or decoder.tflite", "python export/to_onnx.py"),
    Case("sample-zero-n", "sample", lambda c: [str(c.run), "--n", "0", "--out", c.path("g.png")],
         "--n must be a positive integer"),
    Case("sample-bad-out-suffix", "sample", lambda c: [str(c.run), "--out", c.path("g.jpg")],
         r"--out must end in .png or .npy"),
    Case("sample-out-under-a-file", "sample",
         lambda c: [str(c.run), "--n", "4", "--out", c.folder("f", {"a": ""}) + "/a/g.png"],
         "File exists: .*/a", "a part of the path is a file"),
    Case("sample-zero-threads", "sample", lambda c: [str(c.run), "--threads", "0", "--out", c.path("g.png")],
         "threads must be a positive integer"),
    Case("sample-verify-changed-file", "sample",
         lambda c: [str(_changed_decoder(c)), "--verify", "--out", c.path("g.png")],
         "does not match its manifest", "export it again"),
    Case("sample-negative-cols", "sample", lambda c: [str(c.run), "--cols", "-3", "--out", c.path("g.png")],
         "--cols must be a positive integer"),
    Case("encode-not-an-image", "encode",
         lambda c: [str(c.run), c.folder("f", {"a.png": "text"}) + "/a.png", "--out", c.path("c.npy")],
         "cannot read image", "pass png, jpg"),
    Case("encode-wrong-image-size", "encode", lambda c: [str(c.run), _small_png(c), "--out", c.path("c.npy")],
         "is 20x20; the encoder takes 28x28", "pass --resize"),
    Case("encode-missing-image", "encode", lambda c: [str(c.run), c.path("gone.png"), "--out", c.path("c.npy")],
         "no such image file or folder"),
    Case("encode-full-disk", "encode",
         lambda c: [str(c.run), c.folder("digits", {"a.png": IMAGE}), "--out", c.path("c.npy")],
         "No space left on device: .*c.npy", "free some disk space", fault=half_written_then_enospc),
    # --- python -m kvae.demo ---------------------------------------------------------------
    Case("demo-no-such-run", "demo", lambda c: [c.path("nope")], "is not a folder", "pass a run folder"),
    Case("demo-not-exported", "demo", lambda c: [_run_with(c, lambda r: None)], "lacks manifest.json",
         "python export/to_onnx.py"),
    Case("demo-port-out-of-range", "demo", lambda c: [str(c.run), "--port", "70000"],
         "--port must be 0..65535"),
    Case("demo-port-in-use", "demo", lambda c: [str(c.run), "--port", str(_bound_port(c))],
         "port .* is in use", "pass another --port"),
    Case("demo-address-not-here", "demo", lambda c: [str(c.run), "--host", "192.0.2.1", "--port", "0"],
         "cannot listen on 192.0.2.1:0: Cannot assign requested address", "check --host"),
    Case("demo-port-not-a-number", "demo", lambda c: [str(c.run), "--port", "eighty"],
         "argument --port: invalid int value", "--help"),
]


def runtime():
    import kvae.runtime

    return kvae.runtime


def _truncated(c: Ctx, name: str, keep: float = 0.3) -> Path:
    folder = c.export_copy(name)
    truncate(folder / name, keep)
    return folder / name


PROGS = {"fit": "kvae.fit", "evaluate": "kvae.evaluate", "to_tflite": "export/to_tflite.py",
         "to_onnx": "export/to_onnx.py", "runtime": "kvae.runtime", "sample": "kvae.sample",
         "encode": "kvae.encode", "demo": "kvae.demo"}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "export" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(tool: str) -> Callable:
    if tool in ("to_tflite", "to_onnx"):
        return _script(tool).main
    module = importlib.import_module(f"kvae.{tool}")
    return module.main


def files_in(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under the folders -> (size, mtime): what a case must leave as it was."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for folder in folders for p in folder.rglob("*") if p.is_file()}


def check_one_line(prog: str, err: str, case: Case) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"{case.id}: expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    assert re.search(case.wrong, line), f"{case.id}: {case.wrong!r} not in {line!r}"
    if case.todo:
        assert re.search(case.todo, line), f"{case.id}: no hint {case.todo!r} in {line!r}"
    return line


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input(case: Case, exported, tmp_path, capsys, monkeypatch):
    c = Ctx(tmp_path / "scratch", exported)
    c.tmp.mkdir()
    made = case.make(c)
    argv = [a.replace("{tmp}", str(c.tmp)) for a in made] if isinstance(made, list) else made
    before = files_in(c.tmp, exported)
    if case.fault:
        case.fault(monkeypatch)
    if case.tool == "demo":
        demo_without_npm(monkeypatch, tmp_path / "app")
    capsys.readouterr()
    try:
        if case.tool == "runtime":
            from kvae.runtime import RuntimeInputError

            with pytest.raises(RuntimeInputError) as error:  # the documented error, nothing else
                argv()
            err, code = f"kvae.runtime: error: {error.value}\n", 2
            assert "\n" not in str(error.value)
        else:
            with pytest.raises(SystemExit) as exit_:
                _main(case.tool)(argv)
            err, code = capsys.readouterr().err, exit_.value.code
    finally:
        monkeypatch.undo()
        if hasattr(c, "listener"):
            c.listener.close()
    assert code not in (0, None), f"{case.id}: exit code {code}"
    check_one_line(PROGS[case.tool], err, case)
    after = files_in(c.tmp, exported)
    assert not [p for p in after if Path(p).name.startswith(".tmp-")], "temporary files left behind"
    new = sorted(set(after) - set(before))
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    assert not changed, f"{case.id}: changed {changed}"
    assert all(any(Path(p).relative_to(c.tmp).match(g) for g in case.allowed_new) for p in new), \
        f"{case.id}: wrote {new}"


def test_the_matrix_covers_every_tool():
    tools = {}
    for case in CASES:
        tools[case.tool] = tools.get(case.tool, 0) + 1
    assert set(tools) == set(PROGS) and len(CASES) >= 30, tools
    assert len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------------------------
# From the shell: real processes, nothing but one line reaches the terminal


def shell(args: list[str], fsize: int | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Runs `python args...` from the repository root, optionally with RLIMIT_FSIZE = fsize bytes
    (writes past it fail with EFBIG, as at a full quota)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          preexec_fn=limit if fsize else None, **{"timeout": 300, **kwargs})


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without TensorFlow's C++ start-up log lines."""
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.strip() and not TF_LOG.match(line)]


def test_shell_bad_flag_without_usage_dump(tmp_path):
    result = shell(["-m", "kvae.fit", "--latent-dim", "abc", "--out", str(tmp_path / "r")])
    assert result.returncode == 2
    assert error_lines(result) == ["kvae.fit: error: argument --latent-dim: invalid int value: 'abc' "
                                   "(see python -m kvae.fit --help)"]
    assert not (tmp_path / "r").exists()


def test_shell_demo_port_out_of_range(exported):
    result = shell(["-m", "kvae.demo", str(exported), "--port", "70000"], timeout=60)
    assert result.returncode == 2
    assert error_lines(result) == ["kvae.demo: error: --port must be 0..65535 (0 picks a free port), got 70000"]


def test_shell_sample_full_disk(exported, tmp_path):
    out = tmp_path / "grid.png"
    result = shell(["-m", "kvae.sample", str(exported), "--n", "64", "--out", str(out)], fsize=4096)
    assert result.returncode == 2
    [line] = error_lines(result)
    assert line.startswith(f"kvae.sample: error: File too large: {out} (") and "free space" in line
    assert list(tmp_path.iterdir()) == []  # neither grid.png nor a temporary file


@pytest.mark.slow
def test_shell_fit_full_disk_then_resume(tmp_path):
    """Weights (~100 KB) cannot be written: one line; the run folder holds only complete files, and
    once there is room `--resume` finishes the run."""
    from kvae.data import _mnist_5k

    x, _ = _mnist_5k()
    np.savez(tmp_path / "d.npz", x=x[:300, :, :, 0])
    run = tmp_path / "run"
    args = ["-m", "kvae.fit", "--dataset", str(tmp_path / "d.npz"), "--out", str(run), "--epochs", "1",
            "--latent-dim", "2", "--hidden", "16", "--batch-size", "64", "--val-size", "64", "--eval-k", "0"]
    result = shell(args, fsize=60_000)
    assert result.returncode == 2
    [line] = error_lines(result)
    assert line.startswith("kvae.fit: error: File too large: ") and "epoch-0001.weights.h5" in line, line
    assert not list(run.rglob(".tmp-*")) and not (run / "vae.keras").exists()
    assert json.loads((run / "config.json").read_text())["epochs"] == 1  # complete, never half
    result = shell([*args, "--resume"])
    assert result.returncode == 0, result.stderr
    assert (run / "vae.keras").exists() and not list(run.rglob(".tmp-*"))


@pytest.mark.slow
def test_shell_evaluate_truncated_model(exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported, run, ignore=shutil.ignore_patterns("export", "logs"))
    truncate(run / "vae.keras")
    result = shell(["-m", "kvae.evaluate", str(run), "--k", "2"])
    assert result.returncode == 2
    assert error_lines(result) == [
        f"kvae.evaluate: error: {run / 'vae.keras'} is not a complete .keras file (truncated or corrupt): "
        f"write it again with python -m kvae.fit --resume --out {run}"]


@pytest.mark.slow
def test_shell_tflite_export_full_disk(exported, tmp_path):
    """The temporary SavedModel cannot be written: one line, nothing under RUN/export."""
    run = tmp_path / "run"
    shutil.copytree(exported, run, ignore=shutil.ignore_patterns("export", "logs"))
    result = shell(["export/to_tflite.py", str(run), "--quantize", "none"], fsize=100_000,
                   env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 2
    [line] = error_lines(result)
    assert line.startswith("export/to_tflite.py: error: cannot write the encoder's temporary SavedModel"), line
    assert "point TMPDIR at a folder with room" in line
    assert not [p for p in (run / "export").rglob("*") if p.name != "manifest.json"]


def test_keras_files_are_only_loaded_in_safe_mode():
    """Every load_model call in the library and the scripts passes safe_mode=True (a Lambda layer
    in a .keras file could otherwise run arbitrary code; see the code-in-keras-file cases)."""
    import ast

    calls = []
    for path in [*(ROOT / "kvae").glob("*.py"), *(ROOT / "export").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(func, "attr", getattr(func, "id", None)) == "load_model":
                safe = {k.arg: k.value for k in node.keywords}.get("safe_mode")
                calls.append((f"{path.name}:{node.lineno}", isinstance(safe, ast.Constant) and safe.value is True))
    assert calls and all(ok for _, ok in calls), calls
