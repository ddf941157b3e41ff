"""Packaging: `pip install kvae` is the TensorFlow-free runtime, `kvae[train]` the training stack.

Training and export commands without the extra end with one line naming `pip install "kvae[train]"`
(simulated here by a sitecustomize that makes the train extra's packages unimportable); the runtime
side imports without it; the wheel (setup.py) ships the demo's app and exactly the onnxruntime-web
files the app loads. .ci/wheel_check builds the real wheel and runs it in a fresh venv.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvae import demo

REPO = Path(__file__).resolve().parent.parent
TRAIN_EXTRA = 'pip install "kvae[train]"'
# import names of what the `train` extra installs (pyproject.toml), plus JAX
TRAIN_ONLY = ("tensorflow", "tensorboard", "keras", "tensorflow_probability", "tf_keras",
              "tensorflow_datasets", "importlib_resources", "mlxtend", "onnx", "tf2onnx",
              "ai_edge_litert", "sympy", "matplotlib", "tqdm", "jax")
BLOCKER = f"""
import sys

class _WithoutTrainExtra:  # what `pip install kvae` gives: these packages are not there
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {TRAIN_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _WithoutTrainExtra())
"""


@pytest.fixture(scope="module")
def without_train_extra(tmp_path_factory):
    """Returns run(*args, env=None) -> CompletedProcess of `python *args` without the train extra."""
    site = tmp_path_factory.mktemp("without-train-extra")
    (site / "sitecustomize.py").write_text(BLOCKER)

    def run(*args, env=None):
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(site), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), **(env or {})}
        return subprocess.run([sys.executable, *args], cwd=REPO, env=environ, capture_output=True,
                              text=True, timeout=120)

    return run


def test_the_blocker_blocks(without_train_extra):
    done = without_train_extra("-c", "import tensorflow")
    assert done.returncode == 1 and "ModuleNotFoundError" in done.stderr


@pytest.mark.parametrize("command", [
    ["-m", "kvae.fit", "--out", "{tmp}/run"],
    ["-m", "kvae.evaluate", "{tmp}/run"],
    ["export/to_tflite.py", "{tmp}/run"],
    ["export/to_onnx.py", "{tmp}/run"],
], ids=["fit", "evaluate", "to_tflite", "to_onnx"])
def test_train_and_export_commands_name_the_train_extra(without_train_extra, tmp_path, command):
    done = without_train_extra(*[a.format(tmp=tmp_path) for a in command])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert TRAIN_EXTRA in lines[0] and "tensorflow" in lines[0], lines[0]
    assert done.stdout == ""
    assert not (tmp_path / "run").exists()  # nothing written


def test_fit_under_jax_names_the_jax_stack_too(without_train_extra, tmp_path):
    done = without_train_extra("-m", "kvae.fit", "--out", str(tmp_path / "run"),
                               env={"KERAS_BACKEND": "jax"})
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "missing: jax" in line and "requirements-jax.txt" in line and TRAIN_EXTRA in line, line


@pytest.mark.parametrize("command", [
    ["-m", "kvae.fit", "--help"], ["export/to_onnx.py", "--help"], ["export/to_tflite.py", "--help"],
], ids=["fit", "to_onnx", "to_tflite"])
def test_help_works_without_the_train_extra(without_train_extra, command):
    done = without_train_extra(*command)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr


def test_the_runtime_side_imports_without_the_train_extra(without_train_extra):
    modules = ["kvae.runtime", "kvae.sample", "kvae.encode", "kvae.demo", "kvae.contract",
               "kvae.iwae", "kvae.files", "kvae.errors", "kvae.cli", "kvae.plots"]
    done = without_train_extra("-c", f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
                                     "from kvae.plots import png_bytes; import numpy as np\n"
                                     "assert png_bytes(np.zeros((2, 2, 1), np.uint8))[:4] == b'\\x89PNG'\n"
                                     f"print(sorted(set(sys.modules) & set({TRAIN_ONLY!r})))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    for command in (["-m", "kvae.sample", "--help"], ["-m", "kvae.encode", "--help"],
                    ["-m", "kvae.demo", "--help"], ["export/report.py", "--help"]):
        assert without_train_extra(*command).returncode == 0, command


# ---------------------------------------------------------------- the demo inside the wheel
def load_setup():
    spec = importlib.util.spec_from_file_location("kvae_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only as __main__
    return module


def test_the_wheel_ships_the_files_the_page_loads():
    """setup.py's lists against index.html, app.js and what onnxruntime-web's entry module loads."""
    setup = load_setup()
    index = (REPO / "mobile_demo" / "index.html").read_text()
    local = {m for m in re.findall(r'(?:src|href)="([^"#:]+)"', index)}
    assert local and local <= set(setup.APP_FILES), local
    assert demo.ORT_ENTRY in setup.ORT_FILES
    assert f"${{ORT}}{demo.ORT_ENTRY}" in (REPO / "mobile_demo" / "app.js").read_text()
    dist = REPO / "mobile_demo" / demo.ORT_DIST
    if not (dist / demo.ORT_ENTRY).is_file():
        message = "onnxruntime-web is not installed (cd mobile_demo && npm ci --ignore-scripts)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; .ci/run installs it")
        pytest.skip(message)
    # the entry imports its wasm glue module (the proxy worker only with env.wasm.proxy, unused)
    glue = set(re.findall(r"ort-wasm[\w.-]*?\.mjs", (dist / demo.ORT_ENTRY).read_text()))
    glue -= {"ort-wasm-proxy-worker.mjs"}
    assert glue and glue <= set(setup.ORT_FILES), glue
    for name in glue:  # ... and the glue fetches its .wasm
        wasm = set(re.findall(r"ort-wasm[\w.-]*?\.wasm", (dist / name).read_text()))
        assert wasm and wasm <= set(setup.ORT_FILES), (name, wasm)
    assert all(src.is_file() for src, _ in setup.web_files())


def test_the_demo_serves_a_packaged_app(tmp_path):
    """kvae/web/ with ort/ (the wheel's layout) serves like mobile_demo/ with node_modules/."""
    setup = load_setup()
    for _, dst in setup.web_files():
        path = tmp_path / dst
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0asm\1\0\0\0" if dst.suffix == ".wasm" else b"export {};")
    app = tmp_path / setup.WEB
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    for name in demo.REQUIRED_EXPORTS:
        (export / name).write_text("{}")
    assert demo.ort_dir(app) == app / "ort"
    server = demo.make_server(export.parent, port=0, app_dir=app, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for path, mime in [("/", "text/html"), ("/app.js", "text/javascript"),
                           (f"/ort/{demo.ORT_ENTRY}", "text/javascript"),
                           ("/ort/ort-wasm-simd-threaded.wasm", "application/wasm"),
                           ("/export/manifest.json", "application/json")]:
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            conn.close()
            assert response.status == 200 and response.getheader("Content-Type").startswith(mime), path
    finally:
        server.shutdown()
        server.server_close()
