"""Smoke tests for the benchmarks in bench/ (their core functions, with very few iterations)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from bench_scripts import load_script

BENCH = Path(__file__).resolve().parents[1] / "bench"


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
    eager = min(r["ms"] for r in rows if r["engine"] == "keras-eager" and r["half"] == "decoder"
                and r["batch"] == 1)
    fast = min(r["ms"] for r in rows if r["engine"] in ("litert", "onnxruntime")
               and r["half"] == "decoder" and r["batch"] == 1 and r["precision"] == "fp32")
    assert goals[0]["measured"] == pytest.approx(eager / fast)  # the ratio of this run's rows
    assert goals[2]["measured"]["vs_fp32"] == sizes["decoder.int8.tflite"]["vs_fp32"]
    assert goals[5]["measured"] == sizes["decoder.fp16.onnx"]["nll_delta"]
    for goal in goals:
        assert goal["pass"] == goal_met(goal), goal
    text = latency.markdown(result)
    assert text.count("PASS") + text.count("MISS") == 6
    check_verdict_lines(text, goals)
    assert "| Keras eager `model(x)` | fp32 |" in text


# ---------------------------------------------------------------- the goals' verdicts
def goal_met(goal: dict) -> bool:
    """Whether a goal's exact measured value meets its target (the verdict it must carry)."""
    target, measured = goal["target"], goal["measured"]
    if goal["goal"].startswith("batch-1 decode"):
        return measured >= target
    if goal["goal"].startswith("int8 decoder"):
        return (measured["nll_delta"] is not None and measured["vs_fp32"] <= target["vs_fp32"]
                and abs(measured["nll_delta"]) <= target["nll_delta"])
    return measured is not None and abs(measured) <= target


def _printed(text: str) -> tuple[float, float]:
    """The interval a number printed as `text` (e.g. "0.085", "+0.023") stands for."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    half = 0.5 * 10.0 ** -decimals
    return float(text) - half, float(text) + half


def _abs(lo: float, hi: float) -> tuple[float, float]:
    return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))


SPEEDUP = re.compile(r"- \*\*(PASS|MISS)\*\* batch-1 decode >= (\d+)x faster than Keras eager "
                     r"\((.+?)\): Keras eager ([\d.]+) ms / .+? ([\d.]+) ms = (\d+)x$")
INT8 = re.compile(r"- \*\*(PASS|MISS)\*\* int8 decoder \((\w+)\) <= (\d+)% of float32 size, "
                  r"\|NLL change\| <= ([\d.]+) nats: decoder\.int8\.\2: [\d.]+ MB = ([\d.]+)% of "
                  r"float32 \((ok|too big)\); NLL change (?:([+-][\d.]+)(?: ± [\d.]+)? nats|"
                  r"not in the manifest) \((ok|too large)\)")
FP16 = re.compile(r"- \*\*(PASS|MISS)\*\* float16 decoder \((\w+)\) \|NLL change\| <= ([\d.]+) "
                  r"nats: decoder\.fp16\.\2: NLL change (?:([+-][\d.]+)(?: ± [\d.]+)? nats|"
                  r"not in the manifest)")


def verdict_from_line(line: str) -> bool | None:
    """The verdict a goal line's own printed numbers imply: True (PASS), False (MISS), or None
    where the rounding of the printed numbers straddles the target."""
    if m := SPEEDUP.match(line):
        target = float(m[2])
        (e_lo, e_hi), (f_lo, f_hi) = _printed(m[4]), _printed(m[5])
        lo, hi = e_lo / f_hi, e_hi / max(f_lo, 1e-12)
        assert lo - 0.5 <= float(m[6]) <= hi + 0.5, line  # the printed ratio is eager / fast
        return True if lo >= target else False if hi < target else None
    if m := INT8.match(line):
        size_target, nll_target = float(m[3]), float(m[4])
        s_lo, s_hi = _printed(m[5])
        size_ok = True if s_hi <= size_target else False if s_lo > size_target else None
        assert size_ok is None or (m[6] == "ok") == size_ok, line
        if m[7] is None:  # no NLL change measured: the goal cannot be met
            nll_ok = False
        else:
            n_lo, n_hi = _abs(*_printed(m[7]))
            nll_ok = True if n_hi <= nll_target else False if n_lo > nll_target else None
        assert nll_ok is None or (m[8] == "ok") == nll_ok, line
        if size_ok is False or nll_ok is False:
            return False
        return True if size_ok and nll_ok else None
    if m := FP16.match(line):
        if m[4] is None:
            return False
        n_lo, n_hi = _abs(*_printed(m[4]))
        target = float(m[3])
        return True if n_hi <= target else False if n_lo > target else None
    raise AssertionError(f"not a goal line this test can read: {line!r}")


def check_verdict_lines(text: str, goals: list[dict]) -> None:
    """Every PASS/MISS line follows from its own printed value and target (and from the exact
    value in `goals` where the printed rounding cannot tell)."""
    lines = [line for line in text.splitlines() if line.startswith("- **")]
    assert len(lines) == len(goals)
    for line, goal in zip(lines, goals):
        shown = line.startswith("- **PASS**")
        implied = verdict_from_line(line)
        assert shown == (goal_met(goal) if implied is None else implied), line
        assert shown == goal["pass"], line


def fake_inputs(eager_ms: float, fast_ms: float, int8_size: float, int8_nll, fp16_nll):
    """Latency rows and file sizes as latency.measure() reports them, with chosen numbers."""
    rows = [{"engine": "keras-eager", "half": "decoder", "batch": 1, "precision": "fp32",
             "ms": eager_ms, "signature": "dynamic", "threads": 1},
            {"engine": "onnxruntime", "half": "decoder", "batch": 1, "precision": "fp32",
             "ms": fast_ms, "signature": "dynamic", "threads": 1}]
    files = {}
    for fmt in ("tflite", "onnx"):
        files[f"decoder.{fmt}"] = {"size": 1_000_000, "vs_fp32": 1.0, "nll_delta": None,
                                   "nll_delta_se": None}
        files[f"decoder.int8.{fmt}"] = {"size": int(int8_size * 1e6), "vs_fp32": int8_size,
                                        "nll_delta": int8_nll, "nll_delta_se": 0.01}
        files[f"decoder.fp16.{fmt}"] = {"size": 500_000, "vs_fp32": 0.5, "nll_delta": fp16_nll,
                                        "nll_delta_se": 0.001}
    return rows, files


@pytest.mark.parametrize("numbers, verdicts", [
    # (eager ms, fast ms, int8 size ratio, int8 NLL change, fp16 NLL change)
    ((5.0, 0.05, 0.25, 0.10, 0.001), [True] * 6),  # 100x, 25%, +0.1 and +0.001 nats: all met
    ((5.0, 0.5, 0.25, 0.10, 0.001), [False, False, True, True, True, True]),  # only 10x
    ((5.0, 0.05, 0.45, 0.10, 0.001), [True, True, False, False, True, True]),  # int8 too big
    ((5.0, 0.05, 0.25, -0.40, 0.001), [True, True, False, False, True, True]),  # int8 NLL -0.4
    ((5.0, 0.05, 0.25, None, 0.001), [True, True, False, False, True, True]),  # no NLL measured
    ((5.0, 0.05, 0.25, 0.10, -0.05), [True, True, True, True, False, False]),  # fp16 NLL -0.05
    ((5.0, 0.1001, 0.25, 0.10, 0.001), [False, False, True, True, True, True]),  # 49.95x: "50x"
])
def test_goal_verdicts_follow_from_the_measured_values(numbers, verdicts):
    latency = load_script("latency")
    goals = latency.goals(*fake_inputs(*numbers))
    assert [g["pass"] for g in goals] == verdicts
    text = latency.goal_lines({"goals": goals})
    assert [line.startswith("- **PASS**") for line in text.splitlines()] == verdicts
    check_verdict_lines(text, goals)


def test_latency_cli_refuses_a_missing_run(tmp_path, capsys):
    latency = load_script("latency")
    with pytest.raises(SystemExit) as exit_info:
        latency.main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert "no such run folder" in capsys.readouterr().err


# ---------------------------------------------------------------- bench/train_throughput.py
class _Compiled(Exception):
    """Raised by CompileProbe to stop kvae.fit before its first training step."""


def compile_probe():
    import keras

    class CompileProbe(keras.callbacks.Callback):
        """Records how kvae.fit compiled its model (read back from Keras), then stops the run."""

        def on_train_begin(self, logs=None):
            self.compiled = {"jit_compile": bool(self.model.jit_compile),
                             "steps_per_execution": int(self.model.steps_per_execution)}
            raise _Compiled

    return CompileProbe()


@pytest.mark.parametrize("gpus", [[], ["/physical_device:GPU:0"]], ids=["cpu", "gpu"])
def test_throughput_compiles_kvae_as_kvae_fit_does(gpus, monkeypatch, tmp_path):
    """The benchmark times kvae with the XLA setting and steps per execution that kvae.fit uses on
    the same device (a GPU is faked: fit and the benchmark ask the same kvae.fit.accelerators)."""
    from kvae import data as kdata
    from kvae import fit as kvae_fit
    from kvae.config import Config
    from kvae.model import build_vae

    throughput = load_script("train_throughput")
    monkeypatch.setattr(kvae_fit, "accelerators", lambda: list(gpus))
    config = Config(batch_size=128, epochs=1, eval_k=0, latent_dim=4, hidden=16,
                    out=str(tmp_path / "run"))
    probe = compile_probe()
    with pytest.raises(_Compiled):
        kvae_fit.fit(config, callbacks=[probe])
    assert probe.compiled["jit_compile"] == bool(gpus)  # kvae.fit: XLA with a GPU, not on CPU

    steps = kdata.steps_per_epoch(len(kdata.load("mnist-5k").x_train), config.batch_size)
    spe = probe.compiled["steps_per_execution"]
    assert steps % spe == 0 and spe <= config.steps_per_execution
    assert steps % config.steps_per_execution != 0  # this case runs fewer steps than asked for
    vae = build_vae(config, (28, 28, 1))
    vae.compile(optimizer="adam", **throughput.kvae_compile_options(config, steps))
    assert throughput.compiled_as(vae) == probe.compiled
