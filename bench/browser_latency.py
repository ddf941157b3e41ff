"""python bench/browser_latency.py [RUN] [--seconds 0.5] [--rounds 5] [--out bench/results/browser_latency.json]

The exported ONNX files timed inside the demo page, in headless Chromium on a phone viewport
(390x844, touch, as the demo's tests and screenshot), next to onnxruntime-python on the same
machine in the same run. RUN defaults to runs/quickstart and needs its ONNX export (python
export/to_onnx.py RUN).

  browser     onnxruntime-web (WebAssembly, the demo's own files and session options) on
              decoder.onnx / .fp16 / .int8 at batch 1 and 16 and encoder.onnx / .fp16 / .int8
              at batch 1: the page's `InferenceSession.run` with a float32 tensor in and out, on
              1 thread and, the kvae server's COOP/COEP headers making the page cross-origin
              isolated, on 2 threads (`?threads=2`). Timed in the page with performance.now()
              over blocks of calls that last >= BLOCK_MS each (performance.now() is coarse outside
              isolated pages): the median, p10 and p90 of the blocks' per-call times, after
              WARMUP calls.
  python      onnxruntime-python on the same files, batches and thread counts, as
              bench/latency.py times it (its cases, inputs and interleaving: median over calls
              after warm-up).
Every round runs a burst of every case, the cases in a new random order (browser and Python
interleaved), so a busy moment of the shared machine hits them alike. Prints a Markdown table and
the goal (batch-1 float32 decode <= 1 ms in the browser) as PASS/MISS, and writes everything, with
the CPU, versions and load average, to --out.

Needs what the browser tests need: `apt-get install chromium`, `(cd mobile_demo && npm ci)`,
the playwright Python package; it never downloads a browser.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))  # bench/latency.py and bench/machine.py
sys.path.insert(0, str(ROOT / "mobile_demo"))  # mobile_demo/screenshot.py: the phone page

import latency  # noqa: E402
import machine  # noqa: E402
import screenshot  # noqa: E402
from kvae.cli import ArgumentParser, cli_errors  # noqa: E402
from kvae.contract import INPUT, PRECISIONS, filename, read_manifest  # noqa: E402
from kvae.demo import make_server  # noqa: E402
from kvae.errors import KVAEError  # noqa: E402

CASES = (("decoder", 1), ("decoder", 16), ("encoder", 1))  # (half, batch)
THREADS = (1, 2)
WARMUP = 20  # untimed calls per case and page before its first burst (wasm JIT tiers, allocations)
BLOCK_MS = 10.0  # a timed block of calls lasts at least this long (performance.now() resolution)
GOAL_MS = 1.0  # the goal: batch-1 float32 decode in the browser
DEFAULT_RUN = ROOT / "runs" / "quickstart"

OPEN = """async (files) => {
  window.__bench = {};
  for (const file of files) window.__bench[file] = await window.kvae.open(file);
  return {threads: window.kvae.threads, isolated: self.crossOriginIsolated,
          web: window.kvae.ort.env.versions?.web, userAgent: navigator.userAgent};
}"""
BURST = """async ({file, input, data, shape, warmup, blocks, calls}) => {
  const ort = window.kvae.ort;
  const session = window.__bench[file];
  const feeds = {[input]: new ort.Tensor("float32", Float32Array.from(data), shape)};
  for (let i = 0; i < warmup; i++) await session.run(feeds);
  const perCall = [];
  for (let b = 0; b < blocks; b++) {
    const t0 = performance.now();
    for (let i = 0; i < calls; i++) await session.run(feeds);
    perCall.push((performance.now() - t0) / calls);
  }
  return perCall;
}"""


def log(message: str = "") -> None:
    print(message, flush=True)


class BrowserCase:
    """One (page, file, batch): bursts of timed blocks inside the page."""

    def __init__(self, page, threads: int, half: str, precision: str, batch: int, data: np.ndarray):
        self.page, self.threads, self.half, self.precision, self.batch = page, threads, half, precision, batch
        self.file = filename(half, precision, "onnx")
        self.args = {"file": self.file, "input": INPUT[half], "data": data.ravel().tolist(),
                     "shape": list(data.shape)}
        self.calls = 1
        self.times: list[float] = []  # per-call ms of each block

    def calibrate(self) -> None:
        """WARMUP calls, then the block size: calls that last >= BLOCK_MS."""
        [one] = self.page.evaluate(BURST, {**self.args, "warmup": WARMUP, "blocks": 1, "calls": 10})
        self.calls = max(1, math.ceil(BLOCK_MS / max(one, 1e-3)))

    def burst(self, blocks: int) -> None:
        self.times += self.page.evaluate(BURST, {**self.args, "warmup": 0, "blocks": blocks,
                                                 "calls": self.calls})

    def row(self) -> dict:
        times = np.asarray(self.times)
        return {"engine": "onnxruntime-web", "backend": "wasm", "threads": self.threads,
                "half": self.half, "precision": self.precision, "file": self.file, "batch": self.batch,
                "ms": float(np.median(times)), "p10_ms": float(np.percentile(times, 10)),
                "p90_ms": float(np.percentile(times, 90)), "blocks": int(len(times)),
                "calls_per_block": self.calls, "calls": int(len(times) * self.calls)}


def open_pages(context, url: str, files: list[str], problems: list[str]) -> dict[int, object]:
    """One tab per thread count (?threads=N), each with a session on every file."""
    pages, info = {}, {}
    for threads in THREADS:
        page = context.pages[0] if not pages and context.pages else context.new_page()
        page.set_default_timeout(120_000)
        screenshot.watch(page, problems)
        page.goto(f"{url}?threads={threads}")
        page.wait_for_function("window.kvae !== undefined")
        page.evaluate("window.kvae.ready")
        info[threads] = page.evaluate(OPEN, files)
        if info[threads]["threads"] != threads:
            raise KVAEError(f"the page runs {info[threads]['threads']} thread(s), not {threads} "
                            f"(cross-origin isolated: {info[threads]['isolated']})")
        pages[threads] = page
    return pages, info


def chromium_version() -> str:
    done = subprocess.run([str(screenshot.CHROMIUM), "--version"], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()


def measure(run: Path, seconds: float, rounds: int, seed: int = 0) -> dict:
    """Times every case (browser and onnxruntime-python), interleaved; returns the result."""
    from playwright.sync_api import sync_playwright

    export = run / "export"
    try:
        manifest = read_manifest(export)
    except ValueError as e:
        raise KVAEError(f"{e}: export the run again (python export/to_onnx.py {run})") from None
    files = [filename(h, p, "onnx") for h in ("decoder", "encoder") for p in PRECISIONS]
    missing = [name for name in files if not (export / name).is_file()]
    if missing or not manifest:
        raise KVAEError(f"{export} lacks {', '.join(missing) or 'manifest.json'}: run python "
                        f"export/to_onnx.py {run}")
    if manifest.get("conditional"):
        raise KVAEError(f"{run} is a conditional run: this benchmark times unconditional files")
    latent_dim, image_shape = int(manifest["latent_dim"]), [int(d) for d in manifest["image_shape"]]
    python_cases = [c for c in latency.onnxruntime_cases(export, (1, 16), THREADS, latent_dim, image_shape)
                    if (c.half, c.batch) in CASES]
    load_before = os.getloadavg()
    started = time.perf_counter()
    server = make_server(run, port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    problems: list[str] = []
    try:
        with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="kvae-chromium-") as profile:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=str(screenshot.CHROMIUM), args=screenshot.CHROMIUM_FLAGS,
                headless=True, **screenshot.PHONE)
            try:
                pages, info = open_pages(context, url, files, problems)
                browser_cases = [BrowserCase(pages[t], t, half, precision, batch,
                                             latency._inputs(half, batch, latent_dim, image_shape))
                                 for t in THREADS for half, batch in CASES for precision in PRECISIONS]
                log(f"browser_latency: {len(browser_cases)} browser and {len(python_cases)} "
                    f"onnxruntime-python cases, {rounds} interleaved rounds ...")
                for case in browser_cases:
                    case.calibrate()
                for case in python_cases:  # bench/latency.py's warm-up, and one call to size bursts
                    for _ in range(latency.WARMUP):
                        case.call()
                    start = time.perf_counter()
                    case.call()
                    case.one, case.times = time.perf_counter() - start, []
                blocks = max(1, round(seconds * 1000 / BLOCK_MS / rounds))
                rng = np.random.default_rng(seed)
                everything = browser_cases + python_cases
                for r in range(rounds):
                    for i in rng.permutation(len(everything)):
                        case = everything[i]
                        if isinstance(case, BrowserCase):
                            case.burst(blocks)
                        else:
                            burst(case, seconds / rounds)
                    log(f"browser_latency: round {r + 1}/{rounds} done")
            finally:
                context.close()
    finally:
        server.shutdown()
        server.server_close()
    if problems:
        raise KVAEError(f"the page reported problems: {'; '.join(problems)}")
    rows = [c.row() for c in browser_cases] + [{**latency.row(c), "engine": "onnxruntime-python"}
                                               for c in python_cases]
    return {"run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run),
            "latent_dim": latent_dim, "image_shape": image_shape,
            "model": {k: json.loads((run / "config.json").read_text()).get(k)
                      for k in ("arch", "latent_dim", "hidden", "epochs")} if (run / "config.json").is_file() else None,
            "settings": {"seconds": seconds, "rounds": rounds, "warmup_calls": WARMUP,
                         "block_ms": BLOCK_MS, "threads": list(THREADS), "viewport": screenshot.PHONE,
                         "chromium_flags": screenshot.CHROMIUM_FLAGS, "url": "http://127.0.0.1:PORT/?threads=N",
                         "session_options": "mobile_demo/app.js: executionProviders ['wasm'], "
                                            "graphOptimizationLevel 'all'"},
            "machine": {**machine.describe(), "loadavg_1_5_15_before": list(load_before)},
            "versions": {**latency.versions(), "chromium": chromium_version(),
                         "onnxruntime-web": info[1].get("web"), "user_agent": info[1].get("userAgent")},
            "cross_origin_isolated": {str(t): info[t]["isolated"] for t in THREADS},
            "latency": rows, "goal": goal(rows), "seconds": time.perf_counter() - started,
            "command": "python bench/browser_latency.py " + " ".join(sys.argv[1:])}


def burst(case, seconds: float) -> None:
    """One burst of a bench/latency.py case: about `seconds` of timed calls (as its time_cases)."""
    for _ in range(max(1, min(5000, int(seconds / max(case.one, 1e-7))))):
        start = time.perf_counter()
        case.call()
        case.times.append(time.perf_counter() - start)


def goal(rows: list[dict]) -> dict:
    """Batch-1 float32 decode in the browser <= GOAL_MS: the best thread count's median."""
    web = [r for r in rows if r["engine"] == "onnxruntime-web" and r["half"] == "decoder"
           and r["precision"] == "fp32" and r["batch"] == 1]
    best = min(web, key=lambda r: r["ms"])
    python = min((r for r in rows if r["engine"] == "onnxruntime-python" and r["half"] == "decoder"
                  and r["precision"] == "fp32" and r["batch"] == 1), key=lambda r: r["ms"])
    return {"goal": f"batch-1 float32 decode in the browser <= {GOAL_MS} ms", "target_ms": GOAL_MS,
            "measured_ms": best["ms"], "threads": best["threads"], "pass": best["ms"] <= GOAL_MS,
            "onnxruntime_python_ms": python["ms"], "browser_over_python": best["ms"] / python["ms"]}


def table(result: dict) -> str:
    """Markdown: one row per (half, batch, precision); browser and Python by thread count."""
    rows = result["latency"]

    def cell(engine, half, precision, batch, threads):
        found = [r for r in rows if (r["engine"], r["half"], r["precision"], r["batch"], r["threads"])
                 == (engine, half, precision, batch, threads)]
        return f"{found[0]['ms']:.3f}" if found else "-"

    header = ["half", "batch", "file"] + [f"browser {t} thr" for t in THREADS] + \
             [f"onnxruntime-python {t} thr" for t in THREADS] + ["browser / python (1 thr)"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + " |"]
    for half, batch in CASES:
        for precision in PRECISIONS:
            web = [cell("onnxruntime-web", half, precision, batch, t) for t in THREADS]
            py = [cell("onnxruntime-python", half, precision, batch, t) for t in THREADS]
            ratio = f"{float(web[0]) / float(py[0]):.1f}x" if "-" not in (web[0], py[0]) else "-"
            lines.append(f"| {half} | {batch} | `{filename(half, precision, 'onnx')}` | "
                         + " | ".join(web + py) + f" | {ratio} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python bench/browser_latency.py",
                            description="Time the exported ONNX files inside the demo page (headless "
                                        "Chromium, phone viewport) next to onnxruntime-python.")
    parser.add_argument("run", nargs="?", default=str(DEFAULT_RUN),
                        help="run folder with an ONNX export (default runs/quickstart)")
    parser.add_argument("--seconds", type=float, default=0.5, help="timed seconds per case (default 0.5)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "browser_latency.json"),
                        help="result JSON (default bench/results/browser_latency.json)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    with cli_errors("browser_latency"):
        args = parse_args(argv)
        if not screenshot.CHROMIUM.is_file() or not screenshot._has_playwright():
            raise KVAEError("needs /usr/bin/chromium (apt-get install chromium) and the playwright "
                            'Python package (pip install -e ".[test]")')
        if args.seconds <= 0 or args.rounds < 1:
            raise KVAEError("--seconds must be > 0 and --rounds >= 1")
        result = measure(Path(args.run).resolve(), args.seconds, args.rounds)
        log()
        log(table(result))
        g = result["goal"]
        log(f"\n{'PASS' if g['pass'] else 'MISS'}: {g['goal']}: {g['measured_ms']:.3f} ms "
            f"({g['threads']} thread{'s' if g['threads'] > 1 else ''}; onnxruntime-python "
            f"{g['onnxruntime_python_ms']:.3f} ms, {g['browser_over_python']:.1f}x)")
        log(f"CPU: {result['machine']['cpu']}, {result['machine']['cpus']} cores; load "
            f"{result['machine']['loadavg_1_5_15'][0]:.2f}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        from kvae.files import atomic_write_json

        atomic_write_json(out, result)
        log(f"browser_latency: wrote {out}")


if __name__ == "__main__":
    main()
