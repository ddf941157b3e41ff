"""python -m kvae.demo RUN [--port 8000] [--host 127.0.0.1] [--open] | RUN --bundle DIR

Serves the mobile demo: the static web app (onnxruntime-web runs the exported ONNX encoder and
decoder inside the browser, no server-side inference), the run's `RUN/export/` folder and
onnxruntime-web's WebAssembly files, all from this machine (no CDN).

    /            index.html (and the app's other files: APP_FILES: /app.js, /sw.js, /icons/...)
    /export/...  RUN/export/ (manifest.json, encoder.onnx, decoder.onnx, ...)
    /ort/...     onnxruntime-web's files

The app is installable and works offline (a web app manifest and a service worker, sw.js, that
keeps the app, onnxruntime-web and the export in the browser). Every response carries COOP/COEP
headers, so the page is cross-origin isolated (where it is a secure context) and can run
onnxruntime-web on several threads (`?threads=N`).

`--bundle DIR` writes the same site as static files into DIR instead (the app, onnxruntime-web's
three files, and RUN/export/'s manifest with every file it names): any static web host serves it,
kvae not needed.

The app lives in the package (kvae/web/ and kvae/web/ort/: an installed wheel, see setup.py) or,
in a checkout (an editable install), in mobile_demo/ with mobile_demo/node_modules/onnxruntime-web/
dist/ (`npm ci` in mobile_demo/ puts it there).

It listens on 127.0.0.1 unless `--host` says otherwise (`--host 0.0.0.0` lets a phone on the
same network open it). Only GET and HEAD; no directory listings; paths that leave these folders
(`..`, also percent-encoded) are refused. Standard library only: TensorFlow is never imported.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import socket
import sys
import tempfile
import threading
import urllib.parse
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kvae import contract
from kvae.cli import ArgumentParser, cli_errors
from kvae.errors import KVAEError, describe_os_error

PACKAGED_APP = Path(__file__).resolve().parent / "web"  # in an installed wheel (setup.py puts it there)
CHECKOUT_APP = Path(__file__).resolve().parent.parent / "mobile_demo"  # where the app is edited
APP_DIR = PACKAGED_APP if (PACKAGED_APP / "index.html").is_file() else CHECKOUT_APP
ORT_DIST = Path("node_modules") / "onnxruntime-web" / "dist"  # inside a checkout's app folder
PACKAGED_ORT = "ort"  # inside the packaged app folder: only the files app.js loads
ORT_ENTRY = "ort.wasm.min.mjs"  # the module app.js imports (WebAssembly backend only)
REQUIRED_EXPORTS = (contract.MANIFEST, *(contract.filename(h, "fp32", "onnx") for h in contract.HALVES))
# The app's files, relative to its folder: what the server serves at / and --bundle copies; the
# same lists as setup.py's (the wheel) and sw.js's APP_FILES / ORT_FILES (tests/test_demo.py checks).
APP_FILES = ("index.html", "app.js", "style.css", "sw.js", "manifest.webmanifest",
             "icons/icon-192.png", "icons/icon-512.png", "icons/icon-maskable-512.png",
             "icons/apple-touch-icon.png")
APP_FOLDERS = ("icons",)  # the app's sub-folders the server serves (one level, files only)
ORT_FILES = (ORT_ENTRY, "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")  # what app.js loads
# Cross-origin isolation (with a secure context): onnxruntime-web may then run on several threads.
# Everything the page loads is same-origin, so nothing else changes.
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin",
                     "Cross-Origin-Embedder-Policy": "require-corp"}

# Explicit types: Python's `mimetypes` reads the OS tables, which may lack .wasm/.mjs/.onnx, and
# browsers refuse to compile wasm streamed as anything but application/wasm.
MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".webmanifest": "application/manifest+json",
    ".onnx": "application/octet-stream",
    ".ort": "application/octet-stream",
    ".tflite": "application/octet-stream",
    ".config": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".md": "text/markdown; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}


def ort_dir(app_dir: Path) -> Path:
    """onnxruntime-web's files for the app in `app_dir`: its ort/ (packaged) or npm's dist/."""
    packaged = Path(app_dir) / PACKAGED_ORT
    return packaged if packaged.is_dir() else Path(app_dir) / ORT_DIST


def content_type(path: Path) -> str:
    return MIME_TYPES.get(path.suffix.lower(), "application/octet-stream")


class DemoHandler(BaseHTTPRequestHandler):
    """Maps URL paths onto three folders (app, export, ort) and serves plain files only."""

    server: DemoServer
    server_version = "kvae-demo"
    sys_version = ""

    def do_GET(self):
        self._serve(send_body=True)

    def do_HEAD(self):
        self._serve(send_body=False)

    def _serve(self, send_body: bool) -> None:
        status, path = self.server.resolve(self.path)
        if path is None:
            self.send_error(status)
            return
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        with f:
            size = path.stat().st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type(path))
            self.send_header("Content-Length", str(size))
            self.send_header("Cache-Control", "no-cache")  # a re-export shows up on reload
            self.send_header("X-Content-Type-Options", "nosniff")
            for name, value in ISOLATION_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                try:
                    shutil.copyfileobj(f, self.wfile)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the browser stopped reading (page closed); nothing to do

    def log_request(self, code="-", size="-"):
        if isinstance(code, int) and code >= 400:
            super().log_request(code, size)  # only failed requests: a page load makes dozens

    def log_error(self, format, *args):
        pass  # send_error's own line; log_request above already shows the failed request

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


class DemoServer(ThreadingHTTPServer):
    """A threaded HTTP server for the demo; `resolve` is its whole routing table.

    Args:
      address: (host, port); port 0 picks a free one (see `server_address`).
      export_dir: the run's export folder (`RUN/export`).
      app_dir: the web app (`APP_DIR`: kvae/web/ or mobile_demo/).
      quiet: log nothing (tests).
    """

    daemon_threads = True  # a hung browser connection never blocks Ctrl-C
    # listen() backlog: socketserver's default of 5 made 500 simultaneous requests from one
    # client time out (dropped connections); measured: all 500 answered in ~1 s with 1024.
    request_queue_size = 1024

    def __init__(self, address, export_dir: Path, app_dir: Path = APP_DIR, quiet: bool = False):
        self.roots = {
            "": Path(app_dir).resolve(),
            "export": Path(export_dir).resolve(),
            "ort": ort_dir(app_dir).resolve(),
        }
        self.quiet = quiet
        super().__init__(address, DemoHandler)

    def resolve(self, url: str) -> tuple[int, Path | None]:
        """URL path -> (status, file); file is None when it must not be served."""
        raw = urllib.parse.urlsplit(url).path
        if not raw.startswith("/"):
            return HTTPStatus.BAD_REQUEST, None
        try:
            decoded = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return HTTPStatus.BAD_REQUEST, None
        parts = decoded.split("/")[1:]
        if parts == [""]:
            parts = ["index.html"]
        # Refuse anything that could step outside a root: "..", ".", empty segments ("//"),
        # hidden files (".tmp-*" being written), backslashes and NUL, before or after decoding.
        if any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
            return HTTPStatus.FORBIDDEN, None
        if parts[0] in ("export", "ort") and len(parts) > 1:
            root, rest = self.roots[parts[0]], parts[1:]
        elif len(parts) == 1 and parts[0] not in ("export", "ort", "node_modules", *APP_FOLDERS):
            root, rest = self.roots[""], parts  # the app's own top-level files
        elif len(parts) == 2 and parts[0] in APP_FOLDERS:
            root, rest = self.roots[""], parts  # and those of its sub-folders (icons/)
        else:
            return HTTPStatus.NOT_FOUND, None
        path = root.joinpath(*rest).resolve()
        if not path.is_relative_to(root):  # a symlink pointing out of the folder
            return HTTPStatus.FORBIDDEN, None
        if not path.is_file():  # directories included: no listings
            return HTTPStatus.NOT_FOUND, None
        return HTTPStatus.OK, path


def check_folders(run: Path, app_dir: Path = APP_DIR) -> Path:
    """Fails with one line that says what to run if a folder the demo needs is missing."""
    if not run.is_dir():
        raise KVAEError(f"{run} is not a folder; pass a run folder (python -m kvae.fit --out RUN)")
    export_dir = run / "export"
    missing = [name for name in REQUIRED_EXPORTS if not (export_dir / name).is_file()]
    if missing:
        raise KVAEError(f"{export_dir} lacks {', '.join(missing)}: run python export/to_onnx.py {run}")
    if not (app_dir / "index.html").is_file():
        raise KVAEError(f"the web app is missing ({app_dir / 'index.html'}); "
                        "reinstall kvae, or run the demo from a checkout of the kvae repository")
    if not (ort_dir(app_dir) / ORT_ENTRY).is_file():
        raise KVAEError(f"onnxruntime-web is not installed: run (cd {app_dir} && npm ci)")
    return export_dir


def bundle_files(run: str | Path, app_dir: Path = APP_DIR) -> tuple[dict[str, Path], dict[str, str]]:
    """Everything `--bundle` writes, from one read of the manifest: (site, digests).

    site: path inside the site -> the file it is copied from. The app (APP_FILES),
    onnxruntime-web's files (ORT_FILES under ort/), and under export/ the manifest and every file
    it names: its `files` entries and header entries that name a file ({"file": NAME}: a fitted
    prior, the .ort files' operator config).
    digests: path inside the site -> the sha256 its copy must have: export/ files, by what the
    manifest gives them, and the manifest itself, by the bytes that were read.

    Raises:
      KVAEError: a folder or a file the site needs is missing (one line saying what to run).
    """
    app_dir = Path(app_dir)
    export_dir = check_folders(Path(run), app_dir)
    try:
        # its sha256 first: the copy of the manifest must be the one read here (an export that
        # rewrites it meanwhile fails the copy's check instead of mixing two exports)
        manifest_digest = contract.sha256(export_dir / contract.MANIFEST)
        manifest = contract.read_manifest(export_dir)
    except OSError as e:
        raise KVAEError(f"cannot read {export_dir / contract.MANIFEST}: {describe_os_error(e)}") from None
    except ValueError as e:
        raise KVAEError(f"{e}: run python export/to_onnx.py {run}") from None
    site = {name: app_dir / name for name in APP_FILES}
    site.update({f"ort/{name}": ort_dir(app_dir) / name for name in ORT_FILES})
    entries = {**manifest.get("files", {}),
               **{v["file"]: v for v in contract.header_files(manifest).values()}}
    digests = {f"export/{contract.MANIFEST}": manifest_digest}
    for name in (contract.MANIFEST, *entries):
        if Path(name).name != name or name.startswith("."):
            raise KVAEError(f"{export_dir / contract.MANIFEST} names {name!r}, not a file of its folder")
        site[f"export/{name}"] = export_dir / name
        digest = entries[name].get("sha256") if isinstance(entries.get(name), dict) else None
        if isinstance(digest, str) and digest:
            digests[f"export/{name}"] = digest
    missing = [str(path) for path in site.values() if not path.is_file()]
    if missing:
        raise KVAEError(f"the site needs {', '.join(missing)}: export again (python export/to_onnx.py "
                        f"{run}) or reinstall kvae")
    return site, digests


def write_bundle(run: str | Path, out: str | Path, app_dir: Path = APP_DIR) -> dict[str, Path]:
    """Writes the demo as a static site into `out` (`bundle_files`); returns what it wrote.

    The site is assembled in a temporary folder next to `out` and renamed into place, so `out` is
    either complete or as it was. `out` must be new, empty, or an earlier bundle (it is replaced).
    Each export file is checked against the sha256 its manifest gives it, after copying.

    Raises:
      KVAEError: a file is missing, `out` holds something else, or a copy does not match.
    """
    site, digests = bundle_files(run, app_dir)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KVAEError(f"--bundle {out} is a file: pass a folder")
    if out.is_dir() and any(out.iterdir()) and not all(
            (out / p).is_file() for p in ("index.html", "sw.js", f"export/{contract.MANIFEST}")):
        raise KVAEError(f"--bundle {out} holds other files (not an earlier bundle): pass a new or empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise KVAEError(f"cannot write to {out.parent}: {describe_os_error(e)}") from None
    try:
        for rel, src in site.items():
            dst = work / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            digest = digests.get(rel)
            if digest and contract.sha256(dst) != digest:
                what = ("changed while it was bundled" if rel == f"export/{contract.MANIFEST}"
                        else "does not match its manifest's sha256")
                raise KVAEError(f"{src} {what} (an export is running?): bundle again when it has finished")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        try:
            work.rename(out)
        except BaseException:
            if old is not None:  # the earlier bundle back in its place: `out` as it was
                with contextlib.suppress(OSError):
                    old.rename(out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise KVAEError(f"cannot write the site to {out}: {describe_os_error(e)}") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {rel: out / rel for rel in site}


def lan_address() -> str | None:
    """This machine's address on its local network (a UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return None


def make_server(run: str | Path, host: str = "127.0.0.1", port: int = 8000,
                app_dir: Path = APP_DIR, quiet: bool = False) -> DemoServer:
    """Checks the folders and binds the server (not started: call `serve_forever`)."""
    if not 0 <= port <= 65535:
        raise KVAEError(f"--port must be 0..65535 (0 picks a free port), got {port}")
    export_dir = check_folders(Path(run), app_dir)
    try:
        return DemoServer((host, port), export_dir, app_dir, quiet=quiet)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise KVAEError(f"port {port} is in use on {host}: pass another --port") from None
        raise KVAEError(f"cannot listen on {host}:{port}: {e.strerror or e} (check --host: 127.0.0.1 "
                        "is this machine only, 0.0.0.0 every network it is on)") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m kvae.demo",
        description="Serve the mobile demo (the exported ONNX encoder/decoder running in the "
                    "browser with onnxruntime-web) and RUN/export/.",
        epilog="Example: python -m kvae.demo runs/quickstart --open. "
               "--host 0.0.0.0 lets a phone on the same network open it.")
    parser.add_argument("run", metavar="RUN", help="run folder with export/ (python export/to_onnx.py RUN)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0: every network this machine is on)")
    parser.add_argument("--open", action="store_true", help="open the demo in a browser tab")
    parser.add_argument("--bundle", metavar="DIR",
                        help="write the demo as a static site into DIR (app, onnxruntime-web, "
                             "RUN/export/'s manifest and the files it names) instead of serving "
                             "it: any static web host serves DIR, kvae not needed")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    with cli_errors("kvae.demo"):
        args = parse_args(argv)
        if args.bundle:
            written = write_bundle(args.run, args.bundle, APP_DIR)
            size = sum(path.stat().st_size for path in written.values())
            print(f"kvae.demo: wrote the demo's static site to {args.bundle} ({len(written)} files, "
                  f"{size / 1e6:.1f} MB); serve it with any static web server, e.g. python -m "
                  f"http.server -d {args.bundle} (offline use needs https or localhost)", flush=True)
            return
        server = make_server(args.run, args.host, args.port)
        port = server.server_address[1]
        local = "127.0.0.1" if args.host in ("0.0.0.0", "", "::") else args.host
        url = f"http://{local}:{port}/"
        print(f"kvae.demo: serving {Path(args.run) / 'export'} at {url}  (Ctrl-C stops)", flush=True)
        if args.host in ("0.0.0.0", "", "::"):
            lan = lan_address()
            if lan:
                print(f"kvae.demo: on a phone on the same network open http://{lan}:{port}/ "
                      "(anyone on this network can)", flush=True)
        if args.open:
            threading.Timer(0.3, webbrowser.open, (url,)).start()
        try:
            server.serve_forever()
        finally:
            server.server_close()


if __name__ == "__main__":
    sys.exit(main())
