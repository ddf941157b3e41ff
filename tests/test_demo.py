"""The mobile demo: `python -m kvae.demo` (server rules) and the web app in a real headless browser.

The browser tests drive Debian's Chromium (/usr/bin/chromium) with playwright on a phone viewport
with touch emulation, against the `trained_run("conv")` run exported by export/to_onnx.py, and
compare what the page computes with onnxruntime-python on the same inputs; a small conditional
run (`trained_run("mlp", conditional=True)`) checks the class picker the same way. Every browser
test runs twice (SERVERS): against `python -m kvae.demo RUN`'s server, and against a plain static
server (Python's http.server, nothing of kvae) of the site `python -m kvae.demo RUN --bundle DIR`
writes, from a sub-folder of the host. The offline tests go offline (the browser, and the server
is shut down too: playwright's offline mode does not reach a service worker's own requests),
reload, and sample and encode again. Nothing is installed or downloaded here: .ci/run installs
chromium (apt) and runs `npm ci` in mobile_demo/. Without them the browser tests skip locally and
FAIL on CI (CI=true).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.client
import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from kvae import contract, demo
from kvae.demo import (APP_DIR, APP_FILES, ORT_DIST, ORT_ENTRY, ORT_FILES, main, make_server, ort_dir,
                       parse_args, write_bundle)

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).parent / "artifacts"
SCREENSHOT_SCRIPT = REPO / "mobile_demo" / "screenshot.py"  # APP_DIR may be an installed kvae/web/
# the browser setup (Chromium flags, phone viewport, touch helpers) of mobile_demo/screenshot.py,
# which regenerates the README's picture: the picture and these tests drive the same page the same way
_spec = importlib.util.spec_from_file_location("demo_screenshot", SCREENSHOT_SCRIPT)
screenshot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screenshot)
CHROMIUM = screenshot.CHROMIUM
touch_stroke, polyline = screenshot.touch_stroke, screenshot.polyline
TOL = 1e-4  # page (onnxruntime-web, wasm) vs onnxruntime-python on the same file and input


# ---------------------------------------------------------------- the server, on fake folders
@pytest.fixture
def served(tmp_path):
    """A server on a free port over a small fake app and export folder; yields (conn(), folders)."""
    app = tmp_path / "site" / "app"
    dist = app / ORT_DIST
    dist.mkdir(parents=True)
    export = tmp_path / "site" / "run" / "export"
    export.mkdir(parents=True)
    (tmp_path / "site" / "secret.txt").write_text("SECRET-OUTSIDE")
    (tmp_path / "secret.txt").write_text("SECRET-OUTSIDE")
    (app / "icons").mkdir()
    files = {
        app / "index.html": b"<!doctype html><title>demo</title>",
        app / "app.js": b"export const x = 1;",
        app / "style.css": b"body {}",
        app / "sw.js": b"self.addEventListener('fetch', () => {});",
        app / "manifest.webmanifest": b'{"name": "kvae"}',
        **{app / name: b"\x89PNG " + name.encode() for name in APP_FILES if name.startswith("icons/")},
        app / "package.json": b"{}",
        dist / ORT_ENTRY: b"export {};",
        dist / "ort-wasm-simd-threaded.mjs": b"export {};",
        dist / "ort-wasm-simd-threaded.wasm": b"\0asm\1\0\0\0",
        export / "manifest.json": b'{"latent_dim": 2, "image_shape": [28, 28, 1], "files": {}}',
        export / "encoder.onnx": b"onnx-encoder",
        export / "decoder.onnx": b"onnx-decoder",
        export / "decoder.tflite": b"tflite-decoder",
        export / ".tmp-123-decoder.onnx": b"half-written",
    }
    for path, data in files.items():
        path.write_bytes(data)
    (export / "escape.onnx").symlink_to(tmp_path / "secret.txt")
    (export / "sub").mkdir()
    (export / "sub" / "a.json").write_text("{}")

    server = make_server(export.parent, port=0, app_dir=app, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]

    def get(path: str, method: str = "GET", timeout: float = 60):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)  # a safety net
        conn.request(method, path)  # http.client sends the path as is: no "..", "%2e" clean-up
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response, body

    yield get, {"app": app, "export": export, "dist": dist, "port": port, "files": files}
    server.shutdown()
    server.server_close()


def test_server_listens_on_localhost_by_default(served):
    _, folders = served
    assert parse_args(["RUN"]).host == "127.0.0.1" and parse_args(["RUN"]).port == 8000
    server = make_server(folders["export"].parent, port=0, app_dir=folders["app"], quiet=True)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


@pytest.mark.parametrize("path, mime", [
    ("/", "text/html"),
    ("/index.html", "text/html"),
    ("/app.js", "text/javascript"),
    ("/style.css", "text/css"),
    ("/sw.js", "text/javascript"),
    ("/manifest.webmanifest", "application/manifest+json"),
    ("/icons/icon-192.png", "image/png"),
    (f"/ort/{ORT_ENTRY}", "text/javascript"),
    ("/ort/ort-wasm-simd-threaded.mjs", "text/javascript"),
    ("/ort/ort-wasm-simd-threaded.wasm", "application/wasm"),
    ("/export/decoder.onnx", "application/octet-stream"),
    ("/export/manifest.json", "application/json"),
    ("/export/decoder.tflite", "application/octet-stream"),
    ("/export/decoder.onnx?v=2", "application/octet-stream"),
])
def test_server_serves_files_with_their_mime_type(served, path, mime):
    get, folders = served
    response, body = get(path)
    assert response.status == 200
    assert response.getheader("Content-Type").split(";")[0] == mime
    name = path.split("?")[0].rsplit("/", 1)[-1] or "index.html"
    expected = next(data for p, data in folders["files"].items() if p.name == name)
    assert body == expected
    assert int(response.getheader("Content-Length")) == len(expected)
    for name, value in demo.ISOLATION_HEADERS.items():  # cross-origin isolated: threads possible
        assert response.getheader(name) == value, name
    head, head_body = get(path, method="HEAD")
    assert head.status == 200 and head_body == b""
    assert int(head.getheader("Content-Length")) == len(expected)


@pytest.mark.parametrize("path", [
    "/../secret.txt",
    "/../../secret.txt",
    "/export/../../secret.txt",
    "/export/../../../secret.txt",
    "/ort/../../../../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/%2e%2e/secret.txt",
    "/export/%2e%2e/%2e%2e/secret.txt",
    "/export/..%2f..%2fsecret.txt",
    "/export/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/%2e%2e%5csecret.txt",
    "/export/..\\..\\secret.txt",
    "/export/escape.onnx",  # a symlink that points out of the export folder
    "/export/.tmp-123-decoder.onnx",  # a file being written
    "/export/%2etmp-123-decoder.onnx",
    "//secret.txt",
    "/export//secret.txt",
    "/./index.html",
    "/index.html%00.png",
    "/%ff%fe",
    "/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs",  # the app's own node_modules
    "/icons/../../secret.txt",
    "/icons/%2e%2e/%2e%2e/secret.txt",
    "/icons/x/../../../secret.txt",
])
def test_server_refuses_paths_out_of_its_folders(served, path):
    get, _ = served
    response, body = get(path)
    assert response.status in (400, 403, 404), path
    assert b"SECRET" not in body and b"half-written" not in body and b"export {}" not in body


@pytest.mark.parametrize("path", ["/export/", "/export", "/ort/", "/ort", "/export/sub/",
                                  "/node_modules/", "/%2e/", "/icons/", "/icons"])
def test_server_lists_no_directories(served, path):
    get, _ = served
    response, body = get(path)
    assert response.status in (403, 404), path
    for name in (b"manifest.json", b"decoder.onnx", b"ort-wasm", b"a.json", b"<li>"):
        assert name not in body


def test_server_only_reads(served):
    get, _ = served
    for method in ("POST", "PUT", "DELETE"):
        response, _ = get("/export/decoder.onnx", method=method)
        assert response.status == 501


def test_server_answers_while_another_client_hangs(served):
    """Threaded: a phone that opened a connection and went quiet must not block the others.

    Event order, not speed: the second request is answered while the first is still unanswered
    (a one-request-at-a-time server would keep the second waiting until the safety timeout).
    """
    get, folders = served
    with socket.create_connection(("127.0.0.1", folders["port"]), timeout=120) as hung:
        hung.sendall(b"GET /export/decoder.onnx HTTP/1.1\r\nHost: x\r\n")  # no blank line: waits
        response, body = get("/export/manifest.json", timeout=120)
        assert response.status == 200 and json.loads(body)["latent_dim"] == 2
        hung.setblocking(False)
        with pytest.raises(BlockingIOError):  # still unanswered and open: it really was hanging
            hung.recv(1)
        hung.settimeout(120)
        hung.sendall(b"\r\n")  # the request completes now, and is answered
        reply = b""
        while chunk := hung.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(folders["files"][folders["export"] / "decoder.onnx"])


def test_cli_errors_are_one_line(tmp_path, capsys, served):
    _, folders = served
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a folder" in err

    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "export/to_onnx.py" in err and "decoder.onnx" in err

    # The port the fixture's server holds.
    with pytest.raises(SystemExit):
        main([str(folders["export"].parent), "--port", str(folders["port"])])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in use" in err and "--port" in err


# ---------------------------------------------------------------- the installable, offline app and its bundle
def js_list(source: str, name: str) -> list[str]:
    """The strings of `const NAME = [...]` in a JavaScript file."""
    body = re.search(rf"const {name} = \[(.*?)\];", source, re.S)
    assert body, name
    return re.findall(r'"([^"]+)"', body[1])


def test_the_app_file_lists_agree():
    """The server and --bundle (kvae.demo), the wheel (setup.py) and the service worker (sw.js)
    carry the same app files; sw.js caches onnxruntime-web under the version package.json pins."""
    spec = importlib.util.spec_from_file_location("kvae_setup", REPO / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    sw = (REPO / "mobile_demo" / "sw.js").read_text()
    assert tuple(setup.APP_FILES) == APP_FILES and tuple(setup.ORT_FILES) == ORT_FILES
    # sw.js itself is the browser's to keep (it checks for a new one on each visit)
    assert js_list(sw, "APP_FILES") == ["./", *(name for name in APP_FILES if name != "sw.js")]
    assert js_list(sw, "ORT_FILES") == [f"ort/{name}" for name in ORT_FILES]
    pinned = json.loads((REPO / "mobile_demo" / "package.json").read_text())["dependencies"]["onnxruntime-web"]
    assert re.search(r'const ORT_VERSION = "([^"]+)"', sw)[1] == pinned
    for name in APP_FILES:
        assert (REPO / "mobile_demo" / name).is_file(), name
    web_manifest = json.loads((REPO / "mobile_demo" / "manifest.webmanifest").read_text())
    assert web_manifest["start_url"] == "./" and web_manifest["display"] == "standalone"
    icons = {icon["src"]: icon for icon in web_manifest["icons"]}
    assert set(icons) <= set(APP_FILES) and {"192x192", "512x512"} <= {i["sizes"] for i in icons.values()}
    assert any(i["purpose"] == "maskable" for i in icons.values())
    from PIL import Image

    for name, icon in icons.items():  # the sizes the manifest claims are the PNGs' own
        with Image.open(REPO / "mobile_demo" / name) as image:
            assert f"{image.width}x{image.height}" == icon["sizes"], name


def test_the_icons_are_what_make_icons_draws(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_icons", REPO / "mobile_demo" / "make_icons.py")
    make_icons = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_icons)
    monkeypatch.setattr(make_icons, "ICONS", tmp_path)
    make_icons.main()
    for name in make_icons.SIZES:
        assert (tmp_path / name).read_bytes() == (REPO / "mobile_demo" / name.join(["icons/", ""])).read_bytes(), name


@pytest.fixture
def site_source(served):
    """The `served` fixture's fake app and run, with a manifest that names model files in three
    formats, a header file ("prior") and leaves out a stray file; -> (run, app, export)."""
    _, folders = served
    app, export = folders["app"], folders["export"]
    for name in ("encoder.onnx", "decoder.onnx", "decoder.ort", "prior.json", "stray.onnx"):
        (export / name).write_bytes(f"bytes of {name}".encode())
    files = {name: {"half": name.split(".")[0], "format": name.rsplit(".", 1)[1],
                    "sha256": contract.sha256(export / name)}
             for name in ("encoder.onnx", "decoder.onnx", "decoder.tflite", "decoder.ort")}
    manifest = {"latent_dim": 2, "image_shape": [28, 28, 1], "files": files,
                "prior": {"file": "prior.json", "sha256": contract.sha256(export / "prior.json")}}
    (export / "manifest.json").write_text(json.dumps(manifest))
    return export.parent, app, export


def site_tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_the_bundle_is_the_whole_site_and_nothing_else(site_source, tmp_path):
    run, app, export = site_source
    out = tmp_path / "www" / "site"
    written = write_bundle(run, out, app)
    expected = {*APP_FILES, *(f"ort/{name}" for name in ORT_FILES),
                *(f"export/{name}" for name in ("manifest.json", "encoder.onnx", "decoder.onnx",
                                                 "decoder.tflite", "decoder.ort", "prior.json"))}
    assert site_tree(out) == expected == set(written)  # not stray.onnx, .tmp-*, sub/, package.json
    for rel in expected:
        source = export / rel[7:] if rel.startswith("export/") else (
            ort_dir(app) / rel[4:] if rel.startswith("ort/") else app / rel)
        assert (out / rel).read_bytes() == source.read_bytes(), rel
    assert site_tree(tmp_path / "www") == {f"site/{rel}" for rel in expected}  # no temporary folder left
    # again into the same folder: an earlier bundle is replaced, nothing of it stays
    (export / "decoder.ort").write_bytes(b"another export")
    manifest = json.loads((export / "manifest.json").read_text())
    del manifest["files"]["decoder.ort"]
    (export / "manifest.json").write_text(json.dumps(manifest))
    write_bundle(run, out, app)
    assert site_tree(out) == expected - {"export/decoder.ort"}
    assert site_tree(tmp_path / "www") == {f"site/{rel}" for rel in expected - {"export/decoder.ort"}}


def test_the_bundle_refuses_with_one_line(site_source, tmp_path, capsys):
    run, app, export = site_source
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(demo.KVAEError, match="holds other files"):
        write_bundle(run, taken, app)
    assert site_tree(taken) == {"notes.txt"}
    for name in ("decoder.onnx", "prior.json"):  # a model file, a header file: both by their sha256
        saved = (export / name).read_bytes()
        (export / name).write_bytes(b"half-written by an export")
        with pytest.raises(demo.KVAEError, match=f"{name} does not match its manifest.s sha256"):
            write_bundle(run, tmp_path / "new", app)
        assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.tmp-*"))
        (export / name).write_bytes(saved)
    (export / "encoder.onnx").unlink()
    with pytest.raises(SystemExit) as e:
        demo.main([str(run), "--bundle", str(tmp_path / "new")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "encoder.onnx" in err and "to_onnx.py" in err


def test_the_bundle_reads_the_manifest_once(site_source, tmp_path, monkeypatch):
    """The files to copy and the sha256 they are checked against come from one read: a second
    read could see another export's manifest, or a half-written one (a traceback)."""
    run, app, export = site_source
    real, calls = contract.read_manifest, []

    def read_once(folder):
        calls.append(folder)
        if len(calls) > 1:
            raise ValueError(f"{folder}/manifest.json read a second time")
        return real(folder)

    monkeypatch.setattr(contract, "read_manifest", read_once)
    written = write_bundle(run, tmp_path / "bundle", app)
    assert len(calls) == 1 and "export/decoder.ort" in written
    assert (tmp_path / "bundle" / "export" / "manifest.json").read_bytes() == (export / "manifest.json").read_bytes()


def test_a_manifest_rewritten_while_bundling_fails_the_bundle(site_source, tmp_path, monkeypatch):
    """An export that rewrites the manifest after it was read: its copy would not be the manifest
    the other files were checked against."""
    run, app, export = site_source
    real = contract.read_manifest

    def read_then_rewrite(folder):
        manifest = real(folder)
        (Path(folder) / "manifest.json").write_text(json.dumps({**manifest, "files": {}}))
        return manifest

    monkeypatch.setattr(contract, "read_manifest", read_then_rewrite)
    with pytest.raises(demo.KVAEError, match="manifest.json changed while it was bundled"):
        write_bundle(run, tmp_path / "bundle", app)
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle.*"))


def test_a_failed_rename_puts_the_earlier_bundle_back(site_source, tmp_path, monkeypatch):
    """The earlier bundle is moved aside before the new one is renamed into place: if that
    rename fails, the earlier one goes back (not left at .NAME.old-PID with `out` gone)."""
    import pathlib

    run, app, _ = site_source
    out = tmp_path / "www" / "site"
    write_bundle(run, out, app)
    before = {rel: (out / rel).read_bytes() for rel in site_tree(out)}
    rename = pathlib.Path.rename

    def failing_rename(self, target):
        if self.name.startswith(f".{out.name}.tmp-"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", failing_rename)
    with pytest.raises(demo.KVAEError, match="cannot write the site to"):
        write_bundle(run, out, app)
    monkeypatch.undo()
    assert {rel: (out / rel).read_bytes() for rel in site_tree(out)} == before
    assert sorted(p.name for p in (tmp_path / "www").iterdir()) == ["site"]  # no .site.old-*, .site.tmp-*


def test_the_bundle_command(site_source, tmp_path, capsys, monkeypatch):
    run, app, _ = site_source
    monkeypatch.setattr(demo, "APP_DIR", app)  # the fake app as the installed one
    demo.main([str(run), "--bundle", str(tmp_path / "bundle")])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "http.server" in out and str(tmp_path / "bundle") in out
    assert (tmp_path / "bundle" / "sw.js").is_file()


# ---------------------------------------------------------------- the app in Chromium
def require_browser():
    """Skips (locally) or fails (CI=true) with what to install when the browser tools are missing."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if not (ort_dir(APP_DIR) / ORT_ENTRY).is_file():
        missing.append(f"onnxruntime-web (cd {APP_DIR} && npm ci)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append('the playwright Python package (pip install -e ".[test]")')
    if missing:
        message = "the mobile demo's browser test needs " + " and ".join(missing)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)


def test_missing_browser_fails_on_ci_and_skips_locally(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        require_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        require_browser()


@pytest.fixture(scope="session")
def demo_run(trained_run, tmp_path_factory):
    """The conv test run exported by the real exporter (export/to_onnx.py: float32, fp16, int8).

    Exported into a folder of its own (`--out`), so other tests' exports cannot change it.
    """
    run = trained_run("conv")
    demo = tmp_path_factory.mktemp("demo-run")
    subprocess.run([sys.executable, str(REPO / "export" / "to_onnx.py"), str(run),
                    "--out", str(demo / "export")], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return demo


class Onnx:
    """onnxruntime-python sessions on the run's exported files: the reference the page must match."""

    def __init__(self, export_dir: Path):
        import onnxruntime as ort

        self.folder = export_dir
        self.manifest = json.loads((export_dir / "manifest.json").read_text())
        self.latent_dim = self.manifest["latent_dim"]
        self.shape = tuple(self.manifest["image_shape"])
        self.classes = self.manifest.get("classes", [])  # a conditional model's class names
        self.sessions = {f: ort.InferenceSession(str(export_dir / f), providers=["CPUExecutionProvider"])
                         for f in ("encoder.onnx", "decoder.onnx")}

    def condition(self, label: int | None, n: int) -> dict:
        """A conditional model's feed y = one_hot(label), (n, num_classes); {} without a label."""
        return {} if label is None else {"y": np.eye(len(self.classes), dtype=np.float32)[[label] * n]}

    def decode(self, z, file: str = "decoder.onnx", label: int | None = None) -> np.ndarray:
        z = np.asarray(z, np.float32).reshape(-1, self.latent_dim)
        return self.sessions[file].run(["x_mean"], {"z": z, **self.condition(label, len(z))})[0]

    def encode(self, x, label: int | None = None):
        x = np.asarray(x, np.float32).reshape(-1, *self.shape)
        return self.sessions["encoder.onnx"].run(["loc", "scale"], {"x": x, **self.condition(label, len(x))})


SERVERS = ("kvae", "static")  # python -m kvae.demo RUN; a plain static server of its --bundle


class QuietStaticHandler(http.server.SimpleHTTPRequestHandler):
    """Python's own static file server (no kvae code, no COOP/COEP headers), without its log."""

    def log_message(self, format, *args):
        pass


class Serving:
    """The demo of one run on a free port: `url`, `stop()` (the server goes away), `publish(run)`
    (another export at the same address: the kvae server's export folder, or a new bundle)."""

    def __init__(self, kind: str, run: Path, tmp_path_factory):
        self.kind = kind
        if kind == "kvae":
            self.server = make_server(run, port=0, quiet=True)
            path = ""
        else:  # the command's site, in a sub-folder of a plain static host
            www = tmp_path_factory.mktemp("www")
            self.site = www / "site"
            self.bundle(run)
            self.server = http.server.ThreadingHTTPServer(
                ("127.0.0.1", 0), functools.partial(QuietStaticHandler, directory=str(www)))
            path = "site/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{path}"
        self.stopped = False

    def bundle(self, run: Path) -> None:
        done = subprocess.run([sys.executable, "-m", "kvae.demo", str(run), "--bundle", str(self.site)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr

    def publish(self, run: Path) -> None:
        if self.kind == "kvae":
            self.server.roots["export"] = (run / "export").resolve()
        else:
            self.bundle(run)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.server.shutdown()
            self.server.server_close()


@contextlib.contextmanager
def serving(kind: str, run: Path, tmp_path_factory):
    served = Serving(kind, run, tmp_path_factory)
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module", params=SERVERS)
def server_kind(request):
    return request.param


@pytest.fixture(scope="module")
def driver():
    """The module's one sync playwright (a thread drives one at a time): every page of these
    tests is launched from it."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture
def fresh_phone(driver, tmp_path_factory):
    """Returns open(url) -> a context manager of (page, problems, cdp): a phone page on its own
    fresh Chromium profile (no service worker or cache from other tests)."""
    return lambda url: screenshot.phone_page(url, tmp_path_factory.mktemp("chromium-profile"),
                                             playwright=driver)


@pytest.fixture(scope="module")
def browser_page(driver, server_kind, demo_run, tmp_path_factory):
    """A phone-sized, touch-enabled Chromium page on the demo, served by `server_kind`; yields
    (page, problems, onnx, cdp).

    `problems` collects console errors, uncaught exceptions and failed requests for the whole module.
    """
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh --user-data-dir
    with serving(server_kind, demo_run, tmp_path_factory) as served, \
            screenshot.phone_page(served.url, profile, playwright=driver) as (page, problems, cdp):
        yield page, problems, Onnx(demo_run / "export"), cdp
        ARTIFACTS.mkdir(exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        suffix = "" if server_kind == "kvae" else f"_{server_kind}"
        page.screenshot(path=str(ARTIFACTS / f"demo_phone{suffix}.png"), full_page=True)


def canvas_pixels(page, selector: str) -> np.ndarray:
    """The canvas's own pixels (its width x height, not CSS pixels), RGB uint8."""
    data = page.evaluate(f"""() => {{
        const c = document.querySelector({selector!r});
        return {{w: c.width, h: c.height,
                 rgba: Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data)}};
    }}""")
    return np.array(data["rgba"], np.uint8).reshape(data["h"], data["w"], 4)[..., :3]


@pytest.mark.slow
def test_page_loads_on_a_phone_without_errors(browser_page):
    page, problems, onnx, _ = browser_page
    status = page.text_content("#status")
    assert status.startswith("Ready"), status
    assert f"latent_dim {onnx.latent_dim}" in status
    assert page.evaluate("window.innerWidth") == 390  # the phone layout, not a desktop one
    assert page.evaluate("matchMedia('(pointer: coarse)').matches")  # touch emulation is on
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing overflows sideways
    sliders = page.locator("#sliders input[type=range]")
    assert sliders.count() == min(onnx.latent_dim, 16)
    assert page.locator("#pad").is_hidden() == (onnx.latent_dim != 2)
    assert "ms/call" in page.text_content("#perf")
    assert problems == []


def perf_entry(title: str, kind: str, batch: int) -> tuple[float, int]:
    """(median ms, calls) of one `<kind> batch <n>: median X ms over N calls` line of #perf's title."""
    for line in title.splitlines():
        if line.startswith(f"{kind} batch {batch}: median "):
            median, calls = line.split(": median ")[1].split(" ms over ")
            return float(median), int(calls.split()[0])
    return float("nan"), 0


@pytest.mark.slow
def test_the_time_shown_is_the_measured_time_of_each_call(browser_page):
    """#perf shows the time of the call just made: positive, within the time this test measures
    around the same call, and the median of every call so far (no bound on the machine's speed)."""
    page, problems, onnx, _ = browser_page
    page.evaluate("window.kvae.settled()")
    batch = 64  # a batch size the page itself never decodes: only this test's calls count
    _, calls_before = perf_entry(page.get_attribute("#perf", "title"), "decode", batch)
    assert calls_before == 0  # a batch the page never decodes itself: the median is of these calls
    shown = []
    for k in range(3):
        call = page.evaluate(f"""async () => {{
            const z = window.kvae.sampleZ({k}, {batch} * {onnx.latent_dim});
            const t0 = performance.now();
            const x = await window.kvae.decode(z);
            const outer = performance.now() - t0;  // the test's own timing of the same call
            const perf = document.querySelector("#perf");
            return {{outer, n: x.length, last: perf.dataset.lastMs, text: perf.textContent,
                     title: perf.title}};
        }}""")
        assert call["n"] == batch * int(np.prod(onnx.shape))  # the call decoded the whole batch
        last = float(call["last"])
        assert np.isfinite(last) and 0 < last <= call["outer"] + 0.0005, call  # toFixed(3) rounding
        shown.append(last)
        median, calls = perf_entry(call["title"], "decode", batch)
        assert calls == calls_before + k + 1, call["title"]  # every call is recorded
        # the median of exactly these calls (upper median, as app.js)
        assert abs(median - sorted(shown)[len(shown) // 2]) <= 0.0051, (median, shown)
        in_text = re.search(rf"\b{batch}: ([\d.]+) ms", call["text"])  # the bar: 1 decimal
        assert in_text and abs(float(in_text[1]) - median) <= 0.051, call["text"]
    assert problems == []


@pytest.mark.slow
def test_seeded_sample_matches_onnxruntime_python(browser_page):
    page, problems, onnx, _ = browser_page
    page.fill("#seed", "1234")
    page.press("#seed", "Enter")
    page.wait_for_function("window.kvae.state.sample.seed === 1234")
    sample = page.evaluate("""() => { const s = window.kvae.state.sample;
        return {seed: s.seed, n: s.n, z: Array.from(s.z), x: Array.from(s.x)}; }""")
    n, L = sample["n"], onnx.latent_dim
    z = np.array(sample["z"], np.float32).reshape(n, L)
    x_page = np.array(sample["x"], np.float32).reshape(n, *onnx.shape)
    x_python = onnx.decode(z)
    assert np.abs(x_page - x_python).max() <= TOL
    # z comes from the seed (the prior the manifest names, else N(0, I)): reproducible,
    # seed-dependent; its eps standard normal.
    assert page.evaluate(f"Array.from(window.kvae.samplePrior(1234, {n}).z)") == sample["z"]
    many = np.array(page.evaluate("Array.from(window.kvae.sampleZ(7, 20000))"))
    assert abs(many.mean()) < 0.03 and abs(many.std() - 1) < 0.03
    # What is on screen is what was decoded (grid of n images, 8-bit rounding).
    H, W, C = onnx.shape
    cols = round(n ** 0.5)
    grid = canvas_pixels(page, "#grid").astype(int)
    tiles = x_python.reshape(cols, cols, H, W, C).transpose(0, 2, 1, 3, 4).reshape(cols * H, cols * W, C)
    assert np.abs(grid[..., :C] - np.round(255 * tiles)).max() <= 1
    # Re-sample moves to the next seed.
    page.click("#resample")
    page.wait_for_function("window.kvae.state.sample.seed === 1235")
    z_next = page.evaluate("Array.from(window.kvae.state.sample.z)")
    assert z_next == page.evaluate(f"Array.from(window.kvae.samplePrior(1235, {n}).z)") != sample["z"]
    assert problems == []


@pytest.mark.slow
def test_touch_drawing_is_encoded_and_reconstructed(browser_page):
    page, problems, onnx, cdp = browser_page
    pen = page.locator("#pen")
    pen.evaluate("el => el.scrollIntoView({block: 'center'})")  # all of it in the viewport
    box = pen.bounding_box()
    version = page.evaluate("window.kvae.state.draw.version")
    touch_stroke(cdp, polyline(box, [(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)]))  # a "7"
    page.evaluate("window.kvae.settled()")
    draw = page.evaluate("""() => { const d = window.kvae.state.draw;
        return {version: d.version, x: d.x && Array.from(d.x), loc: d.loc && Array.from(d.loc),
                scale: d.scale && Array.from(d.scale), recon: d.recon && Array.from(d.recon)}; }""")
    assert draw["version"] > version and draw["x"] is not None, "the touch stroke was not encoded"
    H, W, C = onnx.shape
    x = np.array(draw["x"], np.float32).reshape(1, H, W, C)
    assert 0 <= x.min() and x.max() <= 1 and 10 < x.sum() < 0.5 * H * W * C  # a stroke, not a blob
    loc, scale = np.array(draw["loc"], np.float32), np.array(draw["scale"], np.float32)
    assert loc.shape == scale.shape == (onnx.latent_dim,) and (scale > 0).all()
    loc_python, scale_python = onnx.encode(x)
    assert np.abs(loc - loc_python[0]).max() <= TOL
    assert np.abs(scale - scale_python[0]).max() <= TOL
    recon = np.array(draw["recon"], np.float32).reshape(1, H, W, C)
    assert np.abs(recon - onnx.decode(loc)).max() <= TOL
    assert recon.std() > 0.01  # an image, not a flat field
    # Shown on the page: input and reconstruction painted, loc / scale listed.
    assert canvas_pixels(page, "#draw-input").max() > 100
    assert canvas_pixels(page, "#draw-recon").max() > 50
    rows = page.locator("#posterior tbody tr")
    assert rows.count() == min(onnx.latent_dim, 16)
    cells = rows.nth(0).locator("td").all_text_contents()
    assert cells == ["z1", f"{loc[0]:.2f}", f"{scale[0]:.2f}"] or (
        float(cells[1]) == pytest.approx(loc[0], abs=0.006) and float(cells[2]) == pytest.approx(scale[0], abs=0.006))
    # The drawing becomes interpolation end A: the strip starts at its reconstruction.
    page.click("#a-from-draw")
    page.wait_for_function("window.kvae.state.slots.a[0] === window.kvae.state.draw.loc[0]")
    page.evaluate("window.kvae.settled()")
    interp = page.evaluate("""() => ({z: Array.from(window.kvae.state.interp.z),
                                      x: Array.from(window.kvae.state.interp.x)})""")
    z_interp = np.array(interp["z"], np.float32).reshape(-1, onnx.latent_dim)
    np.testing.assert_allclose(z_interp[0], loc, atol=1e-6)
    assert np.abs(np.array(interp["x"]).reshape(-1, H, W, C) - onnx.decode(z_interp)).max() <= TOL
    # Clear empties it again.
    page.click("#pen-clear")
    assert page.evaluate("window.kvae.state.draw.loc") is None
    pen.evaluate("el => el.scrollIntoView({block: 'center'})")
    touch_stroke(cdp, polyline(pen.bounding_box(), [(0.5, 0.15), (0.5, 0.85)]))  # a "1", for the screenshot
    page.evaluate("window.kvae.settled()")
    assert page.evaluate("window.kvae.state.draw.loc") is not None
    assert problems == []


@pytest.mark.slow
def test_sliders_and_taps_change_the_image(browser_page):
    page, problems, onnx, _ = browser_page
    slider = page.locator("#sliders input[type=range]").first
    slider.evaluate("el => el.scrollIntoView({block: 'center'})")
    before = canvas_pixels(page, "#explore-out")
    version = page.evaluate("window.kvae.state.explore.version")
    slider.focus()
    page.keyboard.press("End")  # the slider's maximum, through the browser's own input handling
    page.wait_for_function(f"window.kvae.state.explore.version > {version}")
    page.evaluate("window.kvae.settled()")
    explore = page.evaluate("""() => ({z: Array.from(window.kvae.state.explore.z),
                                       x: Array.from(window.kvae.state.explore.x)})""")
    assert explore["z"][0] == 3
    after = canvas_pixels(page, "#explore-out")
    assert np.abs(after.astype(int) - before).max() > 10, "moving the slider did not change the image"
    assert np.abs(np.array(explore["x"]) - onnx.decode(explore["z"]).ravel()).max() <= TOL
    # Tapping a sample sends its z to Explore.
    grid = page.locator("#grid")
    grid.evaluate("el => el.scrollIntoView({block: 'center'})")  # clear of the sticky nav
    box = grid.bounding_box()
    page.touchscreen.tap(box["x"] + 0.6 * box["width"] / 4, box["y"] + 0.4 * box["height"] / 4)  # cell 0
    page.wait_for_function("window.kvae.state.explore.z[0] !== 3")
    page.evaluate("window.kvae.settled()")
    L = onnx.latent_dim
    z_sample = page.evaluate(f"Array.from(window.kvae.state.sample.z.slice(0, {L}))")
    assert page.evaluate("Array.from(window.kvae.state.explore.z)") == z_sample
    # A slider moves its own dimension only.
    if L > 1:
        second = page.locator("#sliders input[type=range]").nth(1)
        second.evaluate("el => el.scrollIntoView({block: 'center'})")
        second.focus()
        page.keyboard.press("Home")
        page.wait_for_function("window.kvae.state.explore.z[1] === -3")
        page.evaluate("window.kvae.settled()")
        assert page.evaluate("Array.from(window.kvae.state.explore.z)") == [z_sample[0], -3, *z_sample[2:]]
    page.locator("#explore").scroll_into_view_if_needed()
    assert problems == []


@pytest.mark.slow
def test_every_onnx_decoder_in_the_manifest_runs_in_the_browser(browser_page):
    """The quantized decoders (fp16, int8) load in onnxruntime-web and match onnxruntime-python."""
    page, problems, onnx, _ = browser_page
    files = page.eval_on_selector_all("#decoder-file option", "options => options.map(o => o.value)")
    expected = sorted(f for f, e in onnx.manifest["files"].items()
                      if e["format"] == "onnx" and e["half"] == "decoder")
    assert sorted(files) == expected and files[0] == "decoder.onnx"
    import onnxruntime as ort

    for file in files[1:] + files[:1]:  # back to float32 last
        page.select_option("#decoder-file", file)
        page.wait_for_function(f"document.querySelector('#status').textContent.startsWith('Ready: {file}')")
        sample = page.evaluate("""() => ({z: Array.from(window.kvae.state.sample.z),
                                          x: Array.from(window.kvae.state.sample.x)})""")
        z = np.array(sample["z"], np.float32).reshape(-1, onnx.latent_dim)
        session = ort.InferenceSession(str(onnx.folder / file), providers=["CPUExecutionProvider"])
        x_python = session.run(["x_mean"], {"z": z})[0]
        assert np.abs(np.array(sample["x"]) - x_python.ravel()).max() <= TOL, file
    assert problems == []


@pytest.mark.slow
def test_screenshot_command_writes_the_readme_picture(demo_run, tmp_path):
    """`python mobile_demo/screenshot.py RUN --out PNG` (the README picture's command) runs the demo
    cleanly and writes a full-page phone screenshot; a run without an export is refused."""
    require_browser()
    out = tmp_path / "docs" / "demo_phone.png"
    done = subprocess.run([sys.executable, str(SCREENSHOT_SCRIPT), str(demo_run), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = (int.from_bytes(png[16 + 4 * i:20 + 4 * i], "big") for i in range(2))
    assert width == 390 * 2 and height > 844 * 2  # the phone viewport at 2x, the whole page
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left behind
    (tmp_path / "bare").mkdir()
    bad = subprocess.run([sys.executable, str(SCREENSHOT_SCRIPT), str(tmp_path / "bare"),
                          "--out", str(tmp_path / "no.png")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "to_onnx.py" in bad.stderr
    assert not (tmp_path / "no.png").exists()


# ---------------------------------------------------------------- a conditional model: the class picker
LABEL_EFFECT = 0.005  # mean |x_mean(class a) - x_mean(class b)| at the same z: 0 if y were ignored


@pytest.fixture(scope="session")
def conditional_run(trained_run, tmp_path_factory):
    """The small conditional mlp run (the one tests/test_conditional_export.py exports in full),
    exported here to float32 ONNX only (encoder.onnx, decoder.onnx: what the page loads first),
    into a folder of its own."""
    from kvae.export_onnx import export_onnx

    run = trained_run("mlp", conditional=True)
    demo = tmp_path_factory.mktemp("demo-conditional-run")
    export_onnx(run, demo / "export", quantize=())
    return demo


@pytest.fixture(scope="module")
def conditional_page(browser_page, server_kind, conditional_run, tmp_path_factory):
    """The demo for the conditional run, served like browser_page's, in a second tab of its
    phone-sized Chromium (playwright's sync API drives one at a time per thread); yields (page,
    problems, onnx, cdp)."""
    first = browser_page[0]
    page = first.context.new_page()
    problems: list[str] = []  # as screenshot.phone_page collects them
    screenshot.watch(page, problems)
    page.set_default_timeout(60_000)  # a safety net, not a speed goal
    try:
        with serving(server_kind, conditional_run, tmp_path_factory) as served:
            page.goto(served.url)
            page.wait_for_function("window.kvae !== undefined")
            page.evaluate("window.kvae.ready")
            yield page, problems, Onnx(conditional_run / "export"), first.context.new_cdp_session(page)
            ARTIFACTS.mkdir(exist_ok=True)
            page.evaluate("window.scrollTo(0, 0)")
            suffix = "" if server_kind == "kvae" else f"_{server_kind}"
            page.screenshot(path=str(ARTIFACTS / f"demo_phone_conditional{suffix}.png"), full_page=True)
    finally:
        page.close()
        first.bring_to_front()


def pick_class(page, label: int, view: str) -> None:
    """Picks class `label` in the nav's picker (a real change event) and waits until `view`
    (sample, explore, draw, interp) was redrawn with it and nothing is left in flight."""
    page.select_option("#class", str(label))
    page.wait_for_function(f"window.kvae.state.{view} && window.kvae.state.{view}.label === {label}")
    page.evaluate("window.kvae.settled()")


@pytest.mark.slow
def test_an_unconditional_run_shows_no_class_picker(browser_page):
    page, problems, onnx, _ = browser_page
    assert "classes" not in onnx.manifest and not onnx.manifest.get("conditional")
    assert page.locator("#class-picker").is_hidden()
    assert page.locator("#class option").count() == 0
    assert page.evaluate("window.kvae.classes") == [] and page.evaluate("window.kvae.label") is None
    assert page.evaluate("window.kvae.state.sample.label") is None
    assert "classes" not in page.text_content("#status")
    assert problems == []


@pytest.mark.slow
def test_the_class_picker_lists_the_manifest_classes(conditional_page):
    page, problems, onnx, _ = conditional_page
    assert onnx.manifest["conditional"] is True and len(onnx.classes) == 10
    status = page.text_content("#status")
    assert status.startswith("Ready") and f"conditional on {len(onnx.classes)} classes" in status, status
    picker = page.locator("#class-picker")
    assert picker.is_visible()
    options = page.eval_on_selector_all("#class option", "os => os.map(o => [o.value, o.textContent])")
    assert options == [[str(i), name] for i, name in enumerate(onnx.classes)]
    assert page.input_value("#class") == "0" and page.evaluate("window.kvae.state.sample.label") == 0
    assert page.evaluate("window.kvae.classes") == onnx.classes
    box = picker.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390  # in the phone's width
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # The picker makes the sticky nav taller: a section link still shows its section's top.
    page.click("nav a[href='#explore']")
    page.wait_for_function("""() => { const top = document.querySelector("#explore").getBoundingClientRect().top;
        return top >= document.querySelector("nav").getBoundingClientRect().bottom && top < 200; }""")
    assert problems == []


@pytest.mark.slow
def test_the_picked_class_conditions_the_seeded_sample(conditional_page):
    """The seeded eps of test_seeded_sample_matches_onnxruntime_python, decoded with y = one_hot(class):
    the page's images equal onnxruntime-python's, and two classes give two different grids."""
    page, problems, onnx, _ = conditional_page
    page.fill("#seed", "1234")
    page.press("#seed", "Enter")
    page.wait_for_function("window.kvae.state.sample.seed === 1234")
    L, H, W, C = onnx.latent_dim, *onnx.shape
    images, diffs = {}, {}
    for label in (3, 7):
        pick_class(page, label, "sample")
        sample = page.evaluate("""() => { const s = window.kvae.state.sample;
            return {seed: s.seed, n: s.n, z: Array.from(s.z), x: Array.from(s.x)}; }""")
        assert sample["seed"] == 1234 and sample["n"] == 16
        assert sample["z"] == page.evaluate("Array.from(window.kvae.samplePrior(1234, 16).z)")
        z = np.array(sample["z"], np.float32).reshape(16, L)
        x_page = np.array(sample["x"], np.float32).reshape(16, H, W, C)
        x_python = onnx.decode(z, label=label)
        diffs[label] = float(np.abs(x_page - x_python).max())
        assert diffs[label] <= TOL, (label, diffs[label])
        grid = canvas_pixels(page, "#grid").astype(int)  # what is on screen is what was decoded
        tiles = x_python.reshape(4, 4, H, W, C).transpose(0, 2, 1, 3, 4).reshape(4 * H, 4 * W, C)
        assert np.abs(grid[..., :C] - np.round(255 * tiles)).max() <= 1
        images[label] = (x_page, grid)
    change = np.abs(images[3][0] - images[7][0]).mean()
    print(f"sample: max abs diff vs onnxruntime-python {max(diffs.values()):.2g}; "
          f"mean abs change class 3 -> 7 {change:.3g}")
    assert change > LABEL_EFFECT, f"the class does not change the images ({change})"
    assert np.abs(images[3][1] - images[7][1]).max() > 10  # and the change is on screen
    assert problems == []


@pytest.mark.slow
def test_explore_and_draw_use_the_picked_class(conditional_page):
    page, problems, onnx, cdp = conditional_page
    H, W, C = onnx.shape
    diffs = []
    pick_class(page, 2, "explore")
    # Explore: the sliders' z, decoded as the picked class; another class redraws the same z.
    slider = page.locator("#sliders input[type=range]").first
    slider.evaluate("el => el.scrollIntoView({block: 'center'})")
    version = page.evaluate("window.kvae.state.explore.version")
    slider.focus()
    page.keyboard.press("End")
    page.wait_for_function(f"window.kvae.state.explore.version > {version}")
    page.evaluate("window.kvae.settled()")
    shown = {}
    for label in (2, 8):
        if label != 2:
            pick_class(page, label, "explore")
        explore = page.evaluate("""() => ({z: Array.from(window.kvae.state.explore.z),
                                           x: Array.from(window.kvae.state.explore.x)})""")
        assert explore["z"][0] == 3
        diffs.append(np.abs(np.array(explore["x"]) - onnx.decode(explore["z"], label=label).ravel()).max())
        assert diffs[-1] <= TOL, (label, diffs[-1])
        shown[label] = canvas_pixels(page, "#explore-out").astype(int)
    assert np.abs(shown[2] - shown[8]).max() > 10, "the class does not change the Explore image"
    # Draw: the stroke encoded with y = the picked class and reconstructed with it.
    pen = page.locator("#pen")
    pen.evaluate("el => el.scrollIntoView({block: 'center'})")
    touch_stroke(cdp, polyline(pen.bounding_box(), [(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)]))  # a "7"
    page.evaluate("window.kvae.settled()")
    posteriors = {}
    for label in (8, 5):
        if label != 8:
            pick_class(page, label, "draw")  # the drawing is encoded again with the new class
        draw = page.evaluate("""() => { const d = window.kvae.state.draw;
            return {label: d.label, x: d.x && Array.from(d.x), loc: d.loc && Array.from(d.loc),
                    scale: d.scale && Array.from(d.scale), recon: d.recon && Array.from(d.recon)}; }""")
        assert draw["label"] == label and draw["x"] is not None, "the touch stroke was not encoded"
        x = np.array(draw["x"], np.float32).reshape(1, H, W, C)
        loc, scale = np.array(draw["loc"], np.float32), np.array(draw["scale"], np.float32)
        loc_python, scale_python = onnx.encode(x, label=label)
        diffs += [np.abs(loc - loc_python[0]).max(), np.abs(scale - scale_python[0]).max(),
                  np.abs(np.array(draw["recon"]) - onnx.decode(loc, label=label).ravel()).max()]
        assert max(diffs[-3:]) <= TOL, (label, diffs[-3:])
        posteriors[label] = (x, loc)
    assert np.array_equal(posteriors[8][0], posteriors[5][0])  # the same drawing ...
    assert np.abs(posteriors[8][1] - posteriors[5][1]).max() > 1e-3  # ... encoded with another y
    # Interpolate: from the drawing's loc, decoded as the picked class.
    page.click("#a-from-draw")
    page.wait_for_function("window.kvae.state.slots.a[0] === window.kvae.state.draw.loc[0]")
    page.evaluate("window.kvae.settled()")
    interp = page.evaluate("""() => ({z: Array.from(window.kvae.state.interp.z), label: window.kvae.state.interp.label,
                                      x: Array.from(window.kvae.state.interp.x)})""")
    assert interp["label"] == 5
    z_interp = np.array(interp["z"], np.float32).reshape(-1, onnx.latent_dim)
    diffs.append(np.abs(np.array(interp["x"]) - onnx.decode(z_interp, label=5).ravel()).max())
    assert diffs[-1] <= TOL
    print(f"explore, draw, interpolate: max abs diff vs onnxruntime-python {max(diffs):.2g}")
    assert problems == []


# ---------------------------------------------------------------- offline, a new export, a fitted prior
def set_seed(page, seed: int) -> dict:
    """Sample with `seed` (the page's own input); returns its state: seed, z, x, components."""
    page.fill("#seed", str(seed))
    page.press("#seed", "Enter")
    page.wait_for_function(f"window.kvae.state.sample.seed === {seed}")
    return page.evaluate("""() => { const s = window.kvae.state.sample;
        return {seed: s.seed, z: Array.from(s.z), x: Array.from(s.x),
                components: s.components && Array.from(s.components)}; }""")


def sample_diff(page, onnx, seed: int = 4321) -> float:
    """Max abs diff between the page's seeded sample and onnxruntime-python's decode of its z."""
    sample = set_seed(page, seed)
    z = np.array(sample["z"], np.float32).reshape(-1, onnx.latent_dim)
    assert sample["z"] == page.evaluate(f"Array.from(window.kvae.samplePrior({seed}, {len(z)}).z)")
    return float(np.abs(np.array(sample["x"]) - onnx.decode(z).ravel()).max())


def drawing_diff(page, onnx, cdp) -> float:
    """A touch stroke drawn, encoded and reconstructed: max abs diff of loc, scale and the
    reconstruction against onnxruntime-python."""
    pen = page.locator("#pen")
    page.click("#pen-clear")
    pen.evaluate("el => el.scrollIntoView({block: 'center'})")
    touch_stroke(cdp, polyline(pen.bounding_box(), [(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)]))  # a "7"
    page.evaluate("window.kvae.settled()")
    draw = page.evaluate("""() => { const d = window.kvae.state.draw;
        return {x: d.x && Array.from(d.x), loc: d.loc && Array.from(d.loc),
                scale: d.scale && Array.from(d.scale), recon: d.recon && Array.from(d.recon)}; }""")
    assert draw["x"] is not None, "the touch stroke was not encoded"
    loc, scale = onnx.encode(np.array(draw["x"], np.float32))
    return max(np.abs(np.array(draw["loc"]) - loc[0]).max(), np.abs(np.array(draw["scale"]) - scale[0]).max(),
               np.abs(np.array(draw["recon"]) - onnx.decode(draw["loc"]).ravel()).max())


def reload_ready(page) -> None:
    page.reload()
    page.wait_for_function("window.kvae !== undefined")
    page.evaluate("window.kvae.ready")
    assert page.text_content("#status").startswith("Ready"), page.text_content("#status")


def go_offline(page, served) -> None:
    """The browser offline, and the server gone: playwright's offline mode does not reach the
    service worker's own requests, a stopped server does."""
    page.context.set_offline(True)
    served.stop()


def offline_urls(url: str, export: Path) -> set[str]:
    """What the service worker must keep of an export: the manifest, and by content every file the
    manifest names but .tflite / .ort (its model files, header files such as the prior)."""
    manifest = contract.read_manifest(export)
    named = {name: e["sha256"] for name, e in manifest["files"].items() if e["format"] not in ("tflite", "ort")}
    named.update({v["file"]: v["sha256"] for v in manifest.values() if isinstance(v, dict) and "file" in v})
    return {f"{url}export/manifest.json", *(f"{url}export/{name}?sha256={sha}" for name, sha in named.items())}


def cached_models(page) -> set[str]:
    return set(page.evaluate("caches.open('kvae-models').then(c => c.keys()).then(k => k.map(r => r.url))"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", SERVERS)
def test_offline_reload_still_samples_and_encodes(fresh_phone, kind, demo_run, tmp_path_factory):
    """First visit online, then no network and no server: the page reloads from the service
    worker's caches and samples, encodes a drawing and switches decoders as before."""
    require_browser()
    onnx = Onnx(demo_run / "export")
    with serving(kind, demo_run, tmp_path_factory) as served, fresh_phone(served.url) as (page, problems, cdp):
        kept = page.evaluate("window.kvae.offline")
        assert kept["supported"] and "error" not in kept, kept
        assert set(kept["cached"]) == offline_urls(served.url, demo_run / "export") <= cached_models(page)
        assert page.text_content("#offline").startswith("Available offline")
        named = onnx.manifest.get("prior")  # kvae.fit may fit a sampling prior (kvae.prior)
        assert page.evaluate("window.kvae.prior") == (
            {"kind": "mixture", "components": named["components"]} if named else {"kind": "standard", "components": 0})
        assert page.evaluate("crossOriginIsolated") == (kind == "kvae")  # COOP/COEP from kvae's server
        online = sample_diff(page, onnx)
        go_offline(page, served)
        reload_ready(page)
        assert page.evaluate("navigator.serviceWorker.controller !== null")
        offline = [sample_diff(page, onnx), drawing_diff(page, onnx, cdp)]
        import onnxruntime as ort

        for file in ("decoder.fp16.onnx", "decoder.int8.onnx"):  # every decoder, from the cache
            page.select_option("#decoder-file", file)
            page.wait_for_function(f"document.querySelector('#status').textContent.startsWith('Ready: {file}')")
            sample = page.evaluate("() => ({z: Array.from(window.kvae.state.sample.z), x: Array.from(window.kvae.state.sample.x)})")
            session = ort.InferenceSession(str(demo_run / "export" / file), providers=["CPUExecutionProvider"])
            z = np.array(sample["z"], np.float32).reshape(-1, onnx.latent_dim)
            offline.append(float(np.abs(np.array(sample["x"]) - session.run(["x_mean"], {"z": z})[0].ravel()).max()))
        print(f"{kind}: max abs diff vs onnxruntime-python online {online:.2g}, offline {max(offline):.2g}")
        assert online <= TOL and max(offline) <= TOL, offline
        assert page.evaluate("window.kvae.offline")["cached"] == kept["cached"]
        assert problems == []
        # really offline: what the caches do not hold cannot be fetched (a failed request, last)
        assert page.evaluate("fetch('export/not-cached.json').then(() => 'fetched', () => 'failed')") == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("kind", SERVERS)
def test_a_new_export_replaces_the_cached_one(fresh_phone, kind, demo_run, tmp_path_factory):
    """A new export (another sha256 in the manifest) is fetched on the next online visit and the
    older file leaves the cache; offline, the page then runs the new one."""
    require_browser()
    new_run = tmp_path_factory.mktemp("re-exported")
    shutil.copytree(demo_run / "export", new_run / "export")
    export = new_run / "export"
    shutil.copyfile(export / "decoder.int8.onnx", export / "decoder.onnx")  # another decoder.onnx
    manifest = contract.read_manifest(export)
    manifest["files"]["decoder.onnx"].update(sha256=contract.sha256(export / "decoder.onnx"),
                                             size=(export / "decoder.onnx").stat().st_size)
    (export / "manifest.json").write_text(json.dumps(manifest, indent=2))
    old, new = Onnx(demo_run / "export"), Onnx(export)
    z = np.random.default_rng(0).standard_normal((16, old.latent_dim), dtype=np.float32)
    assert np.abs(old.decode(z) - new.decode(z)).max() > 10 * TOL  # the test can tell them apart
    with serving(kind, demo_run, tmp_path_factory) as served, fresh_phone(served.url) as (page, problems, cdp):
        page.evaluate("window.kvae.offline")
        assert sample_diff(page, old) <= TOL
        url = lambda m, f: f"{served.url}export/{f}?sha256={m.manifest['files'][f]['sha256']}"  # noqa: E731
        served.publish(new_run)
        reload_ready(page)
        kept = page.evaluate("window.kvae.offline")
        # the page's own request for the new file may have filled the cache before it asked
        assert kept["fetched"] in ([], [url(new, "decoder.onnx")]), kept
        assert kept["removed"] == [url(old, "decoder.onnx")], kept
        assert set(kept["cached"]) == offline_urls(served.url, export) <= cached_models(page)
        assert url(old, "decoder.onnx") not in cached_models(page)
        assert sample_diff(page, new) <= TOL
        go_offline(page, served)
        reload_ready(page)
        assert sample_diff(page, new) <= TOL and drawing_diff(page, new, cdp) <= TOL
        assert problems == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", SERVERS)
def test_a_fitted_prior_in_the_manifest_is_what_sample_draws_from(fresh_phone, kind, demo_run, tmp_path_factory):
    """A manifest "prior" entry (prior.json: a Gaussian mixture, as kvae.prior writes it): Sample
    picks component k with probability weights[k] and decodes z = loc[k] + scale[k] * eps with
    the seed's eps; the file is kept offline and carried by the bundle."""
    require_browser()
    run = tmp_path_factory.mktemp("with-prior")
    shutil.copytree(demo_run / "export", run / "export")
    export = run / "export"
    manifest = contract.read_manifest(export)
    L, weights = manifest["latent_dim"], np.array([0.5, 0.3, 0.2])
    rng = np.random.default_rng(5)
    loc, scale = 2 * rng.standard_normal((3, L)), rng.uniform(0.1, 0.5, (3, L))
    (export / "prior.json").write_text(json.dumps({"kind": "gaussian-mixture-diag", "weights": weights.tolist(),
                                                   "loc": loc.tolist(), "scale": scale.tolist()}))
    manifest["prior"] = {"file": "prior.json", "sha256": contract.sha256(export / "prior.json"), "components": 3}
    (export / "manifest.json").write_text(json.dumps(manifest, indent=2))
    onnx = Onnx(export)
    with serving(kind, run, tmp_path_factory) as served, fresh_phone(served.url) as (page, problems, cdp):
        assert page.evaluate("window.kvae.prior") == {"kind": "mixture", "components": 3}
        assert "fitted prior (a 3-component Gaussian mixture" in page.text_content("#sample-hint")
        kept = page.evaluate("window.kvae.offline")
        assert f"{served.url}export/prior.json?sha256={manifest['prior']['sha256']}" in kept["cached"]
        sample = set_seed(page, 4321)
        eps = np.array(page.evaluate(f"Array.from(window.kvae.sampleZ(4321, {16 * L}))")).reshape(16, L)
        k = np.array(sample["components"])
        f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)  # noqa: E731  (the page's Float32Arrays)
        want = (f32(loc)[k] + f32(scale)[k] * f32(eps)).astype(np.float32)
        assert np.array_equal(np.array(sample["z"], np.float32).reshape(16, L), want)
        assert np.abs(np.array(sample["x"]) - onnx.decode(want).ravel()).max() <= TOL
        picks = np.array(page.evaluate("Array.from(window.kvae.samplePrior(7, 20000).components)"))
        share = np.bincount(picks, minlength=3) / len(picks)
        assert np.abs(share - weights).max() < 0.02, share  # 4.5 standard errors at 20,000 draws
        if kind == "static":
            assert (served.site / "export" / "prior.json").read_bytes() == (export / "prior.json").read_bytes()
        assert problems == []
