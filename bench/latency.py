"""python bench/latency.py RUN [--seconds 0.5] [--rounds 5] [--cold-repeats 3] [--out bench/results/latency.json]

Latency, throughput, file size and cold start of one trained run, every engine measured in one
run on one machine (ratios, not absolute numbers, are what carries over: the machine is shared).
If RUN/export lacks files, exports first (`python export/to_tflite.py RUN --fixed-batch 1 64`,
then `python export/to_onnx.py RUN`, about a minute each).

  latency     ms per call (median over calls after warm-up) and samples/s, encoder and decoder,
              batch 1 and 64, numpy in and numpy out:
                Keras eager `model(x)` and Keras `tf.function` (the run's .keras files),
                LiteRT fp32/fp16/int8, XNNPACK on, the dynamic-batch `serving_default` and the
                fixed `batch1` / `batch64` signatures, 1 and 2 threads,
                onnxruntime fp32/fp16/int8, 1 and 2 intra-op threads (inter-op 1),
                kvae.runtime.Decoder.decode on the fp32 files (the API, its checks included).
              Interleaved: every round runs a short burst of every case in a new random order,
              so a busy moment of the machine hits all cases alike; --rounds rounds, about
              --seconds per case in all.
  size        bytes of every exported file and its ratio to the float32 file of its half/format.
  cold start  fresh `python -c` processes, interleaved: `import kvae.runtime` + onnxruntime or
              LiteRT, open decoder.onnx / decoder.tflite, decode one image; vs import TensorFlow +
              Keras, load decoder.keras, decode one image (medians of --cold-repeats).

Prints Markdown tables and the issue's goals as PASS/MISS with the numbers of this run:
batch-1 decode in onnxruntime or LiteRT >= 50x faster than Keras eager; int8 decoder <= 30% of
the float32 size with validation NLL within 0.25 nats of float32; float16 within 0.02 nats (the NLL
changes are the exporter's paired-eps `nll_delta` from RUN/export/manifest.json). Writes
everything, with versions, thread settings and the load average, to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from kvae import runs  # noqa: E402
from kvae.cli import cli_errors  # noqa: E402
from kvae.contract import FORMATS, HALVES, INPUT, PRECISIONS, filename, read_manifest  # noqa: E402
from kvae.errors import KVAEError  # noqa: E402
sys.path.insert(0, str(ROOT / "bench"))  # bench/machine.py, also when loaded by path
import machine  # noqa: E402

WARMUP = 3  # calls before timing (allocation, XNNPACK weight packing, tf.function tracing)
GOALS = {"speedup": 50.0, "int8_size": 0.30, "int8_nll": 0.25, "fp16_nll": 0.02}

COLD_RUNTIME = """
import time, json
t0 = time.perf_counter()
import kvae.runtime
import {package}
t1 = time.perf_counter()
decoder = kvae.runtime.Decoder({path!r})
x = decoder.sample(1, seed=0)
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_image_s": t2 - t0}}))
"""

COLD_TENSORFLOW = """
import time, json
t0 = time.perf_counter()
import tensorflow
t1 = time.perf_counter()
import keras
decoder = keras.saving.load_model({path!r}, safe_mode=True)
x = decoder(keras.random.normal((1, {latent_dim}), seed=0))
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_image_s": t2 - t0}}))
"""


def log(message: str = "") -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# Export first when files are missing


def export_paths(run: Path) -> dict[str, Path]:
    """The 12 exported files of the contract: name -> path."""
    return {filename(half, p, fmt): run / "export" / filename(half, p, fmt)
            for half in HALVES for p in PRECISIONS for fmt in FORMATS}


def ensure_export(run: Path) -> list[str]:
    """Runs the export scripts for the formats whose files are missing; returns the commands run."""
    run = runs.check_run(Path(run).resolve(), needs=("encoder.keras", "decoder.keras"))
    try:
        listed = read_manifest(run / "export").get("files", {})
    except ValueError:  # an unreadable manifest: the export writes a new one
        listed = {}
    commands = []
    for fmt in FORMATS:
        missing = [n for n, p in export_paths(run).items()
                   if n.endswith(fmt) and not (p.is_file() and n in listed)]
        if missing:
            args = [f"export/to_{fmt}.py", str(run)] + (["--fixed-batch", "1", "64"] if fmt == "tflite" else [])
            log(f"latency: {run}/export lacks {', '.join(missing)}: python {' '.join(args)}")
            result = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=ROOT)
            if result.returncode != 0:
                raise KVAEError(f"exporting {run} failed (python {' '.join(args)}, exit {result.returncode})")
            commands.append("python " + " ".join(args))
    return commands


# ----------------------------------------------------------------------------------------------
# The cases: one callable each, numpy in and numpy out


@dataclass
class Case:
    """One timed configuration."""

    half: str
    engine: str  # keras-eager | keras-tf.function | litert | onnxruntime | kvae.runtime
    precision: str
    signature: str  # dynamic | fixed | auto (kvae.runtime's choice)
    threads: int | None  # None: TensorFlow's own pool
    batch: int
    call: Callable[[], object]
    file: str | None = None
    times: list | None = None


def _inputs(half: str, batch: int, latent_dim: int, image_shape) -> np.ndarray:
    """Held-out-like inputs: binary images for the encoder, z ~ N(0, I) for the decoder."""
    rng = np.random.default_rng(batch)
    if half == "encoder":
        return (rng.random((batch, *image_shape)) < 0.2).astype(np.float32)
    return rng.standard_normal((batch, latent_dim), dtype=np.float32)


def keras_cases(run: Path, batches, latent_dim: int, image_shape) -> list[Case]:
    """Keras eager `model(x)` and a traced `tf.function`, numpy in and out (as a user calls them)."""
    import tensorflow as tf

    import kvae.model  # noqa: F401  (registers kvae's serializable layers)

    cases = []
    for half in HALVES:
        model = runs.load_keras(run / f"{half}.keras")
        shape = tuple(image_shape) if half == "encoder" else (latent_dim,)
        fn = _traced(model, shape)
        for batch in batches:
            v = _inputs(half, batch, latent_dim, image_shape)
            eager = lambda m=model, v=v: tf.nest.map_structure(np.asarray, m(v, training=False))  # noqa: E731
            traced = lambda f=fn, v=v: tf.nest.map_structure(lambda t: t.numpy(), f(v))  # noqa: E731
            cases.append(Case(half, "keras-eager", "fp32", "dynamic", None, batch, eager, f"{half}.keras"))
            cases.append(Case(half, "keras-tf.function", "fp32", "dynamic", None, batch, traced,
                              f"{half}.keras"))
    return cases


def _traced(model, shape):
    """model as a tf.function traced once for any batch (float32 input)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, *shape), tf.float32)])
    def fn(v):
        return model(v, training=False)

    return fn


def litert_cases(export: Path, batches, threads, latent_dim: int, image_shape, signatures: dict) -> list[Case]:
    """Every .tflite file x threads x {dynamic serving_default, fixed batch<N>} x batch.

    The dynamic signature gets one interpreter per batch size (a runner resized back and forth
    would re-allocate on every call); the fixed signatures share one interpreter.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    cases = []
    for half in HALVES:
        for precision in PRECISIONS:
            name = filename(half, precision, "tflite")
            keys = signatures.get(name, [])
            for t in threads:
                def open_():
                    return Interpreter(model_path=str(export / name), num_threads=t,
                                       experimental_op_resolver_type=OpResolverType.AUTO)  # XNNPACK on
                fixed = open_()
                for batch in batches:
                    v = _inputs(half, batch, latent_dim, image_shape)
                    dynamic = open_().get_signature_runner("serving_default")
                    cases.append(Case(half, "litert", precision, "dynamic", t, batch,
                                      lambda r=dynamic, v=v, k=INPUT[half]: r(**{k: v}), name))
                    if f"batch{batch}" in keys:
                        runner = fixed.get_signature_runner(f"batch{batch}")
                        cases.append(Case(half, "litert", precision, "fixed", t, batch,
                                          lambda r=runner, v=v, k=INPUT[half]: r(**{k: v}), name))
    return cases


def onnxruntime_cases(export: Path, batches, threads, latent_dim: int, image_shape) -> list[Case]:
    """Every .onnx file x intra-op threads x batch (one session per file and thread count)."""
    import onnxruntime as ort

    cases = []
    for half in HALVES:
        for precision in PRECISIONS:
            name = filename(half, precision, "onnx")
            for t in threads:
                options = ort.SessionOptions()
                options.log_severity_level = 3
                options.intra_op_num_threads = t
                options.inter_op_num_threads = 1
                session = ort.InferenceSession(str(export / name), options, providers=["CPUExecutionProvider"])
                for batch in batches:
                    v = _inputs(half, batch, latent_dim, image_shape)
                    cases.append(Case(half, "onnxruntime", precision, "dynamic", t, batch,
                                      lambda s=session, v=v, k=INPUT[half]: s.run(None, {k: v}), name))
    return cases


def api_cases(export: Path, batches, threads, latent_dim: int) -> list[Case]:
    """kvae.runtime.Decoder.decode on the float32 files (its input checks and chunking included)."""
    from kvae.runtime import Decoder

    cases = []
    for name in ("decoder.onnx", "decoder.tflite"):
        for t in threads:
            decoder = Decoder(export / name, threads=t)
            for batch in batches:
                v = _inputs("decoder", batch, latent_dim, None)
                cases.append(Case("decoder", "kvae.runtime", "fp32", "auto", t, batch,
                                  lambda d=decoder, v=v: d.decode(v), name))
    return cases


# ----------------------------------------------------------------------------------------------
# Timing


def time_cases(cases: list[Case], seconds: float, rounds: int, seed: int = 0) -> None:
    """Fills case.times (seconds per call), interleaving all cases round by round.

    Each case: WARMUP untimed calls, then `rounds` bursts of about seconds/rounds each (at least
    one call), every round in a new random order of the cases.
    """
    burst = seconds / rounds
    calls = {}
    for case in cases:
        for _ in range(WARMUP):
            case.call()
        start = time.perf_counter()
        case.call()
        one = time.perf_counter() - start
        calls[id(case)] = max(1, min(5000, int(burst / max(one, 1e-7))))
        case.times = []
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        for i in rng.permutation(len(cases)):
            case = cases[i]
            times = case.times
            call = case.call
            for _ in range(calls[id(case)]):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)


def row(case: Case) -> dict:
    times = np.asarray(case.times)
    ms = float(np.median(times) * 1000)
    return {"half": case.half, "engine": case.engine, "precision": case.precision,
            "signature": case.signature, "threads": case.threads, "batch": case.batch,
            "file": case.file, "ms": ms, "p10_ms": float(np.percentile(times, 10) * 1000),
            "p90_ms": float(np.percentile(times, 90) * 1000), "calls": int(len(times)),
            "samples_per_s": case.batch * 1000.0 / ms}


def fresh_process(code: str) -> dict:
    """A fresh Python process's own timings and its whole wall time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise KVAEError(f"a cold-start process failed: {result.stderr.strip().splitlines()[-1:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_s": wall}


def cold_start(run: Path, latent_dim: int, repeats: int) -> dict:
    """Medians over `repeats` fresh processes per kind, the kinds interleaved (rotated each repeat)."""
    export = run / "export"
    codes = {
        "onnxruntime": COLD_RUNTIME.format(package="onnxruntime", path=str(export / "decoder.onnx")),
        "litert": COLD_RUNTIME.format(package="ai_edge_litert.interpreter",
                                      path=str(export / "decoder.tflite")),
        "tensorflow": COLD_TENSORFLOW.format(path=str(run / "decoder.keras"), latent_dim=latent_dim),
    }
    runs: dict[str, list] = {name: [] for name in codes}
    names = list(codes)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(fresh_process(codes[name]))
    cold = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} | {"repeats": len(rs)}
            for name, rs in runs.items()}
    tf = cold["tensorflow"]
    ratios = {f"{key}_tensorflow_over_{name}": tf[key] / cold[name][key]
              for name in ("onnxruntime", "litert") for key in ("import_s", "first_image_s", "process_s")}
    return {"processes": cold, "ratios": ratios}


# ----------------------------------------------------------------------------------------------
# Sizes and goals


def sizes(export: Path, manifest: dict) -> dict:
    """filename -> size, its ratio to the float32 file of the same half and format, nll_delta."""
    out = {}
    for name, path in sorted(export_paths(export.parent).items()):
        half, fmt = name.split(".")[0], name.rsplit(".", 1)[1]
        precision = name.split(".")[1] if name.count(".") == 2 else "fp32"
        base = (export / f"{half}.{fmt}").stat().st_size
        entry = manifest.get("files", {}).get(name, {})
        out[name] = {"half": half, "format": fmt, "precision": precision, "size": path.stat().st_size,
                     "vs_fp32": path.stat().st_size / base, "nll_delta": entry.get("nll_delta"),
                     "nll_delta_se": (entry.get("nll") or {}).get("delta_se"),
                     "signatures": entry.get("signatures"), "quantization": entry.get("quantization"),
                     "int8_candidates": entry.get("int8_candidates")}
    return out


def goals(rows: list[dict], files: dict) -> list[dict]:
    """The issue's goals, measured in this run: [{goal, target, measured, pass, text}]."""
    result = []

    def best(engines, precisions=PRECISIONS):
        found = [r for r in rows if r["half"] == "decoder" and r["batch"] == 1
                 and r["engine"] in engines and r["precision"] in precisions]
        return min(found, key=lambda r: r["ms"]) if found else None

    eager = best(("keras-eager",))
    for label, precisions in (("float32", ("fp32",)), ("any precision", PRECISIONS)):
        fast = best(("litert", "onnxruntime"), precisions)
        if eager and fast:
            ratio = eager["ms"] / fast["ms"]
            where = f"{describe(fast)}, {fast['threads']} thread{'s' if fast['threads'] != 1 else ''}"
            result.append({
                "goal": f"batch-1 decode >= {GOALS['speedup']:.0f}x faster than Keras eager ({label})",
                "target": GOALS["speedup"], "measured": ratio, "pass": ratio >= GOALS["speedup"],
                "text": f"Keras eager {eager['ms']:.2f} ms / {where} {fast['ms']:.3f} ms = {ratio:.0f}x"})
    for fmt in FORMATS:
        entry = files[f"decoder.int8.{fmt}"]
        delta = entry["nll_delta"]
        ok_size = entry["vs_fp32"] <= GOALS["int8_size"]
        ok_nll = delta is not None and abs(delta) <= GOALS["int8_nll"]
        others = "".join(  # ONNX: the exporter's other int8 method, not written (it keeps the lower NLL)
            f"; the unused {method} candidate: {c['size'] / files[f'decoder.{fmt}']['size']:.1%}, "
            f"{c['nll_delta']:+.3f} nats"
            for method, c in (entry.get("int8_candidates") or {}).items()
            if method != entry.get("quantization") and "size" in c)
        result.append({
            "goal": f"int8 decoder ({fmt}) <= {GOALS['int8_size']:.0%} of float32 size, "
                    f"|NLL change| <= {GOALS['int8_nll']} nats",
            "target": {"vs_fp32": GOALS["int8_size"], "nll_delta": GOALS["int8_nll"]},
            "measured": {"vs_fp32": entry["vs_fp32"], "nll_delta": delta},
            "pass": bool(ok_size and ok_nll),
            "text": f"decoder.int8.{fmt}: {entry['size'] / 1e6:.2f} MB = {entry['vs_fp32']:.1%} of "
                    f"float32 ({'ok' if ok_size else 'too big'}); NLL change "
                    f"{_nats(delta, entry['nll_delta_se'])} ({'ok' if ok_nll else 'too large'})"
                    + (f" ({entry['quantization']} quantization{others})" if entry.get("quantization") else "")})
    for fmt in FORMATS:
        entry = files[f"decoder.fp16.{fmt}"]
        delta = entry["nll_delta"]
        ok = delta is not None and abs(delta) <= GOALS["fp16_nll"]
        result.append({
            "goal": f"float16 decoder ({fmt}) |NLL change| <= {GOALS['fp16_nll']} nats",
            "target": GOALS["fp16_nll"], "measured": delta, "pass": bool(ok),
            "text": f"decoder.fp16.{fmt}: NLL change {_nats(delta, entry['nll_delta_se'])}, "
                    f"size {entry['vs_fp32']:.1%} of float32"})
    return result


def describe(r: dict) -> str:
    """'LiteRT int8 `batch1`', 'onnxruntime fp32', ... for one latency row."""
    if r["engine"] == "litert":
        sig = f"`batch{r['batch']}`" if r["signature"] == "fixed" else "`serving_default`"
        return f"LiteRT {r['precision']} {sig}"
    if r["engine"] == "kvae.runtime":
        return f"kvae.runtime ({r['file']})"
    return f"{ENGINES.get(r['engine'], r['engine'])} {r['precision']}"


def _nats(delta, se) -> str:
    if delta is None:
        return "not in the manifest"
    return f"{delta:+.3f}" + (f" ± {se:.3f}" if se is not None else "") + " nats"


# ----------------------------------------------------------------------------------------------
# The measurement


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("numpy", "onnxruntime", "ai-edge-litert", "tensorflow", "keras"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def measure(run: str | Path, seconds: float = 0.5, rounds: int = 5, threads=(1, 2), batches=(1, 64),
            cold_repeats: int = 3, seed: int = 0) -> dict:
    """Measures every engine on RUN's files (exported already: see ensure_export); returns the result.

    Args:
      run: a run folder with export/ (all 12 files and manifest.json).
      seconds: timed seconds per case, split over `rounds` interleaved rounds.
      rounds: interleaved rounds.
      threads: thread counts for LiteRT and onnxruntime (TensorFlow: max(threads) intra-op
        threads when TensorFlow is not initialized yet, else whatever it has).
      batches: batch sizes.
      cold_repeats: fresh processes per cold-start number (0: skip the cold start).

    Returns:
      A JSON-able dict: settings, machine, versions, latency rows, sizes, cold start, goals.
    """
    run = Path(run).resolve()
    export = run / "export"
    missing = [str(p) for p in export_paths(run).values() if not p.is_file()]
    if missing or not (export / "manifest.json").is_file():
        raise KVAEError(f"{export} lacks {', '.join(missing) or 'manifest.json'}: "
                        f"run python bench/latency.py {run} (it exports first)")
    try:
        manifest = read_manifest(export)
    except ValueError as e:
        raise KVAEError(f"{e}: export the run again") from None
    if manifest.get("conditional"):
        raise KVAEError(f"{run} is a conditional run: bench/latency.py times unconditional files "
                        "(their halves take no y)")
    latent_dim, image_shape = int(manifest["latent_dim"]), [int(d) for d in manifest["image_shape"]]
    signatures = {name: list(e.get("signatures") or {}) for name, e in manifest.get("files", {}).items()}
    no_fixed = sorted({f"batch{b}" for name in export_paths(run) if name.endswith(".tflite")
                       for b in batches if f"batch{b}" not in signatures.get(name, [])})
    if no_fixed:
        log(f"latency: the .tflite files lack the fixed signatures {', '.join(no_fixed)} (no 'fixed' rows "
            f"for them); export with: python export/to_tflite.py {run} --fixed-batch 1 64")
    load_before = os.getloadavg()
    started = time.perf_counter()

    if cold_repeats > 0:
        log(f"latency: cold start, {cold_repeats} fresh process(es) per kind ...")
    cold = cold_start(run, latent_dim, cold_repeats) if cold_repeats > 0 else None

    import tensorflow as tf

    try:  # TensorFlow's pools are fixed once it runs its first op (e.g. in a test process)
        tf.config.threading.set_intra_op_parallelism_threads(max(threads))
        tf.config.threading.set_inter_op_parallelism_threads(max(threads))
    except RuntimeError:
        pass
    tf_threads = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                  "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
    cases = (keras_cases(run, batches, latent_dim, image_shape)
             + litert_cases(export, batches, threads, latent_dim, image_shape, signatures)
             + onnxruntime_cases(export, batches, threads, latent_dim, image_shape)
             + api_cases(export, batches, threads, latent_dim))
    log(f"latency: timing {len(cases)} cases, {rounds} interleaved rounds, ~{seconds} s each ...")
    time_cases(cases, seconds, rounds, seed)
    rows = [row(c) for c in cases]
    files = sizes(export, manifest)
    return {
        "run": str(run), "latent_dim": latent_dim, "image_shape": image_shape,
        "settings": {
            "seconds_per_case": seconds, "rounds": rounds, "warmup_calls": WARMUP,
            "threads": list(threads), "batches": list(batches), "cold_repeats": cold_repeats,
            "tensorflow_threads": tf_threads, "litert": "XNNPACK on (OpResolverType.AUTO)",
            "onnxruntime": "CPUExecutionProvider, intra_op_num_threads = threads, inter_op 1, "
                           "default graph optimizations",
        },
        "machine": {**machine.describe(), "loadavg_1_5_15_before": list(load_before),
                    "loadavg_1_5_15_after": list(os.getloadavg())},
        "versions": versions(),
        "seconds": time.perf_counter() - started,
        "latency": rows, "sizes": files, "cold_start": cold, "goals": goals(rows, files),
        "missing_fixed_signatures": no_fixed,
        "notes": [
            "ms: median over every timed call (after warm-up) of one case; p10/p90 beside it. "
            "samples_per_s = batch / median. Every call takes numpy inputs and returns numpy outputs.",
            "Cases are interleaved: each of `rounds` rounds runs a short burst of every case in a "
            "new random order, so load from other jobs on this shared machine spreads over all cases.",
            "litert signature 'dynamic' = serving_default (any batch; one interpreter per batch "
            "size), 'fixed' = the batch<N> signature of the same file (XNNPACK runs a fixed-shape "
            "Conv2DTranspose much faster).",
            "kvae.runtime = kvae.runtime.Decoder.decode on the float32 file (input checks and its "
            "signature choice included).",
            "Keras rows run in TensorFlow's thread pools (tensorflow_threads; 0 = all cores).",
            "Sizes: bytes on disk; the TFLite files hold every signature (serving_default, batch1, "
            "batch64) with one copy of the weights. NLL changes: the exporter's nll_delta in "
            "manifest.json (validation IWAE NLL with the variant minus float32 Keras, paired eps).",
            "cold_start: medians over fresh processes, kinds interleaved; import_s and first_image_s "
            "are timed inside the process, process_s is its whole wall time.",
        ],
    }


# ----------------------------------------------------------------------------------------------
# Printing


ENGINES = {"keras-eager": "Keras eager `model(x)`", "keras-tf.function": "Keras `tf.function`",
           "litert": "LiteRT (XNNPACK)", "onnxruntime": "onnxruntime",
           "kvae.runtime": "kvae.runtime `Decoder.decode`"}


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def latency_table(result: dict, half: str) -> str:
    """One row per engine/precision/signature (and file for kvae.runtime); threads as columns."""
    rows = [r for r in result["latency"] if r["half"] == half]
    threads = result["settings"]["threads"]
    batches = result["settings"]["batches"]
    eager = {r["batch"]: r["ms"] for r in rows if r["engine"] == "keras-eager"}
    head = ["engine", "precision", "batch signature"]
    for b in batches:
        head += [f"b{b} ms ({t} thr)" for t in threads]
    head += [f"b{batches[0]} vs eager", f"b{batches[-1]} samples/s"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + " |"]
    groups = {}
    for r in rows:
        key = (r["engine"], r["precision"], r["signature"], r["file"] if r["engine"] == "kvae.runtime" else "")
        groups.setdefault(key, {})[(r["batch"], r["threads"])] = r
    for (engine, precision, signature, file), cells in groups.items():
        keras = engine.startswith("keras")
        label = ENGINES[engine] + (f" (`{file}`)" if file else "")
        sig = {"dynamic": "dynamic" if engine != "litert" else "dynamic (`serving_default`)",
               "fixed": "fixed (`batch<N>`)", "auto": "its choice"}[signature]
        line = [label, precision, sig]
        for b in batches:
            for t in threads:
                r = cells.get((b, None if keras else t))
                line.append(_ms(r["ms"]) if r and (not keras or t == max(threads)) else "-")
        fastest = {b: min((r["ms"] for (bb, _), r in cells.items() if bb == b), default=None) for b in batches}
        b0, b1 = batches[0], batches[-1]
        line.append(f"{eager[b0] / fastest[b0]:.0f}x" if fastest[b0] and b0 in eager else "-")
        line.append(f"{b1 * 1000 / fastest[b1]:,.0f}" if fastest[b1] else "-")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def size_table(result: dict) -> str:
    lines = ["| file | fp32 | fp16 | int8 | fp16 NLL change | int8 NLL change |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    files = result["sizes"]
    for half in HALVES:
        for fmt in FORMATS:
            cell = {}
            for p in PRECISIONS:
                cell[p] = files[filename(half, p, fmt)]
            lines.append(f"| {half} .{fmt} | {cell['fp32']['size'] / 1e6:.2f} MB | "
                         f"{cell['fp16']['size'] / 1e6:.2f} MB ({cell['fp16']['vs_fp32']:.0%}) | "
                         f"{cell['int8']['size'] / 1e6:.2f} MB ({cell['int8']['vs_fp32']:.0%}) | "
                         f"{_nats(cell['fp16']['nll_delta'], cell['fp16']['nll_delta_se'])} | "
                         f"{_nats(cell['int8']['nll_delta'], cell['int8']['nll_delta_se'])} |")
    return "\n".join(lines)


def cold_table(result: dict) -> str:
    """The TensorFlow-free runtime vs TensorFlow: cold start, then decode through each API."""
    cold = result["cold_start"]
    if not cold:
        return "(cold start skipped)"
    p, r = cold["processes"], cold["ratios"]
    threads = result["settings"]["threads"]
    batches = result["settings"]["batches"]
    decode = {}
    for row_ in result["latency"]:
        if row_["half"] == "decoder" and row_["engine"] in ("kvae.runtime", "keras-eager"):
            decode.setdefault(row_["file"] if row_["engine"] == "kvae.runtime" else "keras", {})[
                (row_["batch"], row_["threads"])] = row_["ms"]
    thr = " / ".join(str(t) for t in threads)
    lines = ["| | import | first image (import + open + decode) | whole process | "
             + " | ".join(f"decode, batch {b} ({thr} threads)" for b in batches) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in batches) + " |"]
    for name, label, key in (("onnxruntime", "kvae.runtime + onnxruntime", "decoder.onnx"),
                             ("litert", "kvae.runtime + LiteRT", "decoder.tflite"),
                             ("tensorflow", "TensorFlow + Keras (`decoder.keras`, eager `model(z)`)", "keras")):
        c, d = p[name], decode.get(key, {})
        if key == "keras":  # TensorFlow's own pools
            cells = [f"{_ms(d.get((b, None)))} ms" for b in batches]
        else:
            cells = [" / ".join(_ms(d.get((b, t))) for t in threads) + " ms" for b in batches]
        lines.append(f"| {label} | {c['import_s'] * 1000:.0f} ms | {c['first_image_s'] * 1000:.0f} ms | "
                     f"{c['process_s'] * 1000:.0f} ms | " + " | ".join(cells) + " |")
    lines.append(f"\nTensorFlow takes {r['import_s_tensorflow_over_onnxruntime']:.0f}x (onnxruntime) / "
                 f"{r['import_s_tensorflow_over_litert']:.0f}x (LiteRT) longer to import, and "
                 f"{r['first_image_s_tensorflow_over_onnxruntime']:.0f}x / "
                 f"{r['first_image_s_tensorflow_over_litert']:.0f}x longer to its first image "
                 f"(medians of {p['tensorflow']['repeats']} fresh processes each).")
    return "\n".join(lines)


def goal_lines(result: dict) -> str:
    return "\n".join(f"- **{'PASS' if g['pass'] else 'MISS'}** {g['goal']}: {g['text']}"
                     for g in result["goals"])


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    tf = s["tensorflow_threads"]
    header = (f"Median ms per call after {s['warmup_calls']} warm-up calls, {s['rounds']} interleaved "
              f"rounds, ~{s['seconds_per_case']} s per case; LiteRT with XNNPACK, onnxruntime "
              f"intra-op threads as shown (inter-op 1); Keras in TensorFlow's pools (intra-op "
              f"{tf['intra_op'] or 'all cores'}); {m['cpus']} CPUs ({m.get('cpu', 'model not recorded')}), load "
              f"average {m['loadavg_1_5_15_before'][0]:.1f} before / {m['loadavg_1_5_15_after'][0]:.1f} after.")
    return "\n\n".join([
        header,
        "**Decoder** (z -> x_mean)\n\n" + latency_table(result, "decoder"),
        "**Encoder** (x -> loc, scale)\n\n" + latency_table(result, "encoder"),
        "**File sizes** (vs float32; NLL change: the exporter's paired validation `nll_delta`)\n\n"
        + size_table(result),
        "**Without TensorFlow**: cold start (fresh processes) and decode through `kvae.runtime`\n\n" + cold_table(result),
        "**Goals** (issue 7)\n\n" + goal_lines(result),
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/latency.py", description=__doc__.split("\n\n")[1])
    parser.add_argument("run", help="run folder (exported first if RUN/export lacks files)")
    parser.add_argument("--seconds", type=float, default=0.5, help="timed seconds per case (default 0.5)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--cold-repeats", type=int, default=3,
                        help="fresh processes per cold-start number (default 3; 0 skips)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latency.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ chatter (here and in children)
    with cli_errors("bench/latency.py"):
        if args.seconds <= 0 or args.rounds < 1 or args.cold_repeats < 0:
            raise KVAEError("--seconds must be > 0, --rounds >= 1 and --cold-repeats >= 0")
        run = Path(args.run)
        if not run.is_dir():
            raise KVAEError(f"no such run folder: {run} (train one: python -m kvae.fit --out {run})")
        started = time.perf_counter()
        exported = ensure_export(run)
        log(f"latency: {run.resolve()}, {os.cpu_count()} CPUs (shared), load average "
            f"{os.getloadavg()[0]:.1f}; measuring ...")
        result = measure(run, args.seconds, args.rounds, cold_repeats=args.cold_repeats)
        result["command"] = "python bench/latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
        result["exported_first"] = exported
        result["total_seconds"] = time.perf_counter() - started
        log("\n" + markdown(result))
        from kvae.files import atomic_write_json

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)
        log(f"\nwrote {args.out} ({result['total_seconds']:.0f} s in all, measuring {result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
