"""Concurrent use: one runtime Decoder shared by 8 threads, and the demo server under 500 parallel
requests.

- 10,000 decodes from 8 threads through ONE `kvae.runtime.Decoder` (ONNX and TFLite), three
  rounds, give exactly the outputs of serial calls, and the process's resident memory stays flat.
  onnxruntime sessions are thread-safe; a LiteRT interpreter is not, so the runtime serializes its
  calls (without that, 15-25% of the outputs came back wrong here).
- `python -m kvae.demo`'s server answers 500 simultaneous requests from a client on 127.0.0.1
  (model files byte for byte, the manifest, the page) while idle connections hang on it, refuses
  every path-traversal variant among them and lists no directories, and keeps answering after.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

THREADS = 8
DECODES = 10_000  # per round
ROUNDS = 3
DISTINCT = 500  # distinct z; decode i takes z[i % DISTINCT]
FLAT_MB = 8  # at least one round of 10,000 decodes grows resident memory by less than this
RSS_GROWTH_MB = 32  # and all rounds together by less than this


@pytest.fixture(scope="session")
def exported(exported_run) -> Path:
    """The conv test run with every file exported (shared with the other test files)."""
    return exported_run("conv")


def rss_mb() -> float:
    """Resident memory of this process (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def decode_from_threads(pool: ThreadPoolExecutor, decoder, z: np.ndarray, out: np.ndarray) -> None:
    """len(out) single-row decodes of z[i % len(z)] into out[i], spread over the pool's threads,
    all sharing `decoder`."""
    def one(i: int):
        out[i] = decoder.decode(z[i % len(z)][None])[0]

    list(pool.map(one, range(len(out)), chunksize=25))  # re-raises the first error of any thread


def count_differences(out: np.ndarray, serial: np.ndarray) -> int:
    """Rows of out that differ from serial[i % len(serial)] (row by row: no large temporary
    arrays that would move the resident-memory numbers)."""
    return sum(not np.array_equal(out[i], serial[i % len(serial)]) for i in range(len(out)))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_one_decoder_shared_by_8_threads(exported, fmt):
    """Same outputs as serial calls; memory flat: a leak would grow every round of 10,000 (one
    float32 image a decode is 31 MB a round), while the allocator's one-time growth for new threads
    (per-thread malloc arenas, measured 10-20 MB here) shows in the first round only."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("reads resident memory from /proc (Linux)")
    from kvae.runtime import Decoder

    decoder = Decoder(exported / "export" / f"decoder.{fmt}", threads=1)
    z = np.random.default_rng(8).standard_normal((DISTINCT, decoder.latent_dim), dtype=np.float32)
    serial = np.stack([decoder.decode(z[i][None])[0] for i in range(DISTINCT)])
    out = np.full((DECODES, *decoder.image_shape), np.nan, np.float32)  # paged in before measuring

    with ThreadPoolExecutor(THREADS) as pool:
        rss = [rss_mb()]
        for round_ in range(ROUNDS):
            out[:] = np.nan
            started = time.perf_counter()
            decode_from_threads(pool, decoder, z, out)
            seconds = time.perf_counter() - started
            rss.append(rss_mb())
            wrong = count_differences(out, serial)
            assert wrong == 0, f"round {round_}: {wrong} of {DECODES} outputs differ from serial calls"
    growth = np.diff(rss)
    print(f"{fmt}: {ROUNDS} x {DECODES} decodes from {THREADS} threads, last round {seconds:.1f} s; "
          f"RSS {rss[0]:.0f} MB, growth per round {', '.join(f'{g:+.1f}' for g in growth)} MB")
    assert min(growth) < FLAT_MB, f"resident memory grew in every round: {growth} MB"
    assert rss[-1] - rss[0] < RSS_GROWTH_MB, f"resident memory grew by {rss[-1] - rss[0]:.1f} MB"


# ----------------------------------------------------------------------------------------------
# The demo server

PARALLEL = 500
IDLE = 20  # connections that send half a request and wait, during the load
TRAVERSALS = [
    "/../secret.txt",
    "/export/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/export/%2e%2e/%2e%2e/secret.txt",
    "/export/..%2f..%2fsecret.txt",
    "/export/%2E%2E%2F%2E%2E%2Fsecret.txt",
    "/%2e%2e%5csecret.txt",
    "/export/..\\..\\secret.txt",
    "/export/%252e%252e/secret.txt",  # double-encoded
    "//secret.txt",
    "/export/escape.txt",  # a symlink out of the export folder
]
LISTINGS = ["/export/", "/export", "/ort/", "/%2e/"]


@pytest.fixture
def demo_server(exported, tmp_path):
    """The demo server over the real export folder (a copy holding a symlink out of it) and a
    stand-in web app; yields (port, export folder)."""
    import shutil

    from kvae.demo import ORT_DIST, ORT_ENTRY, DemoServer

    (tmp_path / "secret.txt").write_text("SECRET-OUTSIDE")
    export = tmp_path / "site" / "run" / "export"
    shutil.copytree(exported / "export", export)
    (export / "escape.txt").symlink_to(tmp_path / "secret.txt")
    app = tmp_path / "site" / "app"
    (app / ORT_DIST).mkdir(parents=True)
    (app / "index.html").write_text("<!doctype html><title>kvae</title>")
    (app / ORT_DIST / ORT_ENTRY).write_text("export {};")
    server = DemoServer(("127.0.0.1", 0), export, app, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], export
    server.shutdown()
    server.server_close()


def get(port: int, path: str, timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)  # sent as is: no client-side clean-up of ".." or "%2e"
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.slow
def test_demo_server_answers_500_parallel_requests(demo_server):
    port, export = demo_server
    files = {f"/export/{name}": (export / name).read_bytes()
             for name in ("decoder.onnx", "encoder.onnx", "manifest.json")}
    files["/"] = b"<!doctype html><title>kvae</title>"
    paths = [*files, *TRAVERSALS, *LISTINGS]
    results: list = [None] * PARALLEL
    barrier = threading.Barrier(PARALLEL)

    def client(i: int):
        path = paths[i % len(paths)]
        barrier.wait()  # all at once
        try:
            results[i] = (path, *get(port, path))
        except Exception as e:  # counted below
            results[i] = (path, repr(e), b"")

    idle = []
    for _ in range(IDLE):  # slow clients hold connections open during the load
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /export/decoder.onnx HTTP/1.1\r\nHost: x\r\n")  # no blank line: it waits
        idle.append(s)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(PARALLEL)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    for s in idle:
        s.close()

    statuses = Counter(status for _, status, _ in results)
    print(f"{PARALLEL} parallel requests (+{IDLE} idle connections) in {seconds:.1f} s: {dict(statuses)}")
    failed = [(path, status) for path, status, _ in results if not isinstance(status, int)]
    assert not failed, f"{len(failed)} requests got no answer, e.g. {failed[:3]}"
    for path, status, body in results:
        if path in files:
            assert status == 200 and body == files[path], (path, status)
        else:  # traversal or a folder: refused, and nothing of what lies outside or a listing
            assert status in (400, 403, 404), (path, status)
            assert b"SECRET" not in body and b"decoder.onnx" not in body and b"<li>" not in body, path
    assert get(port, "/export/manifest.json", timeout=10) == (200, files["/export/manifest.json"])
