"""bench/browser_latency.py: the ONNX files timed inside the demo page next to onnxruntime-python.

The verdict and the table follow from the rows (no browser); one short run on the conv test run's
export drives the real page in Chromium on both thread counts (slow; skips without the browser
tools locally and fails on CI, as tests/test_demo.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench_scripts import load_script
from test_demo import require_browser

REPO = Path(__file__).resolve().parent.parent


def rows(web_fp32_b1: float) -> list[dict]:
    """Every case, engine and thread count: the browser's batch-1 float32 decode `web_fp32_b1`
    ms, its other cases 2 ms, onnxruntime-python 0.1 ms; 2 threads 1.5x slower throughout."""
    bench = load_script("browser_latency")
    out = []
    for engine in ("onnxruntime-web", "onnxruntime-python"):
        for threads in bench.THREADS:
            for half, batch in bench.CASES:
                for precision in ("fp32", "fp16", "int8"):
                    ms = 0.1 if engine == "onnxruntime-python" else (
                        web_fp32_b1 if (half, batch, precision) == ("decoder", 1, "fp32") else 2.0)
                    out.append({"engine": engine, "threads": threads, "half": half, "batch": batch,
                                "precision": precision, "ms": ms * (1 if threads == 1 else 1.5)})
    return out


@pytest.mark.parametrize("ms, verdict", [(0.4, True), (1.0, True), (1.2, False)])
def test_the_goal_is_the_best_thread_counts_float32_batch1_decode(ms, verdict):
    bench = load_script("browser_latency")
    goal = bench.goal(rows(ms))
    assert goal["pass"] is verdict and goal["measured_ms"] == ms and goal["threads"] == 1
    assert goal["onnxruntime_python_ms"] == 0.1 and goal["browser_over_python"] == pytest.approx(ms / 0.1)
    table = bench.table({"latency": rows(ms)})
    assert f"| decoder | 1 | `decoder.onnx` | {ms:.3f} | {1.5 * ms:.3f} | 0.100 | 0.150 |" in table
    assert table.count("\n") == 2 + len(bench.CASES) * 3 - 1


def test_a_run_without_its_onnx_export_is_one_line(tmp_path):
    (tmp_path / "export").mkdir()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "browser_latency.py"), str(tmp_path),
                           "--out", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300)
    if "needs /usr/bin/chromium" in done.stderr:
        require_browser()  # skips (or fails on CI) with what to install
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "to_onnx.py" in done.stderr, done.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_a_short_run_times_every_case_in_the_page(trained_run, tmp_path):
    require_browser()
    from kvae.export_onnx import export_onnx

    run = tmp_path / "run"
    source = trained_run("conv")
    run.mkdir()
    (run / "config.json").write_text((source / "config.json").read_text())
    export_onnx(source, run / "export")
    out = tmp_path / "browser_latency.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "browser_latency.py"), str(run),
                           "--seconds", "0.05", "--rounds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "batch-1 float32 decode in the browser" in done.stdout
    result = json.loads(out.read_text())
    web = [r for r in result["latency"] if r["engine"] == "onnxruntime-web"]
    python = [r for r in result["latency"] if r["engine"] == "onnxruntime-python"]
    assert len(web) == len(python) == 18  # (decoder b1, b16, encoder b1) x 3 precisions x 2 threads
    assert {r["threads"] for r in web} == {1, 2} and result["cross_origin_isolated"] == {"1": True, "2": True}
    for r in web:
        assert 0 < r["p10_ms"] <= r["ms"] <= r["p90_ms"] and r["calls"] >= r["blocks"] >= 1, r
    assert result["machine"]["cpu"] and result["versions"]["onnxruntime-web"] == "1.30.0"
    assert result["goal"]["measured_ms"] == min(r["ms"] for r in web if (r["half"], r["batch"], r["precision"])
                                                == ("decoder", 1, "fp32"))
