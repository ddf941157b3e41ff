"""Smoke tests for the benchmarks in bench/ (their core functions, with very few iterations)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_script(name: str):
    """bench/<name>.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def exported_conv(exported_run) -> Path:
    """The conv test run with every file exported (same check as tests/test_runtime.py's fixture)."""
    return exported_run("conv")


def test_latency_measures_every_engine(exported_conv):
    latency = load_script("latency")
    result = latency.measure(exported_conv, seconds=0.01, rounds=2, threads=(1,), batches=(1, 2),
                             cold_repeats=1)
    result = json.loads(json.dumps(result))  # JSON-able as written to bench/results/latency.json

    rows = result["latency"]
    engines = {r["engine"] for r in rows}
    assert engines == {"keras-eager", "keras-tf.function", "litert", "onnxruntime", "kvae.runtime"}
    for half in ("encoder", "decoder"):
        for engine in ("litert", "onnxruntime"):
            got = {(r["precision"], r["batch"]) for r in rows if r["half"] == half and r["engine"] == engine}
            assert got == {(p, b) for p in ("fp32", "fp16", "int8") for b in (1, 2)}, (half, engine)
    # the test export has the exporter's default fixed signature batch1 only: fixed rows at batch 1
    fixed = {(r["half"], r["batch"]) for r in rows if r["signature"] == "fixed"}
    assert fixed == {("encoder", 1), ("decoder", 1)}
    assert result["missing_fixed_signatures"] == ["batch2"]
    for r in rows:
        assert r["calls"] >= 2 and 0 < r["p10_ms"] <= r["ms"] <= r["p90_ms"], r
        assert r["samples_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms"])

    sizes = result["sizes"]
    assert len(sizes) == 12 and sizes["decoder.onnx"]["vs_fp32"] == 1.0
    assert 0.1 < sizes["decoder.int8.tflite"]["vs_fp32"] < 0.9
    assert sizes["decoder.int8.onnx"]["nll_delta"] is not None  # from the exporter's manifest

    cold = result["cold_start"]["processes"]
    assert set(cold) == {"onnxruntime", "litert", "tensorflow"}
    assert all(0 < c["import_s"] <= c["first_image_s"] < c["process_s"] for c in cold.values())

    goals = result["goals"]
    assert len(goals) == 6 and all(isinstance(g["pass"], bool) and g["text"] for g in goals)
    text = latency.markdown(result)
    assert text.count("PASS") + text.count("MISS") == 6
    assert "| Keras eager `model(x)` | fp32 |" in text


def test_latency_cli_refuses_a_missing_run(tmp_path, capsys):
    latency = load_script("latency")
    with pytest.raises(SystemExit) as exit_info:
        latency.main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert "no such run folder" in capsys.readouterr().err
