"""python bench/runtime_latency.py [RUN] [--repeats 3] [--seconds 1.0] [--out bench/results/runtime_latency.json]

How much lighter is the TensorFlow-free runtime than TensorFlow, measured in one run on one
machine (RUN defaults to runs/quickstart; export it first with export/to_onnx.py and
export/to_tflite.py):

  import     fresh `python -c` processes: `import kvae.runtime` plus the runtime package
             (onnxruntime / ai_edge_litert) vs `import tensorflow` (median of --repeats)
  cold start a fresh process until its first decoded image: import + open RUN/export/decoder.onnx
             (or .tflite) + one sample, vs import TensorFlow/Keras + load RUN/decoder.keras + one
             decode; also the process's whole wall time (interpreter start and exit included)
  latency    ms per Decoder.decode call at batch 1 and 64, and per sample, for onnxruntime and
             LiteRT (XNNPACK on), in this process after a warm-up (median over calls)

Prints the numbers and the ratios, and writes them (with versions and the machine) to --out.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

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


def fresh_process(code: str, repeats: int) -> dict:
    """Medians of a fresh Python process's own timings and of its whole wall time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"runtime_latency: a timing process failed:\n{result.stderr[-2000:]}")
        runs.append({**json.loads(result.stdout.strip().splitlines()[-1]), "process_s": wall})
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def decode_latency(path: Path, batch: int, seconds: float) -> dict:
    """ms per Decoder.decode call (median over calls for about `seconds`), and per sample."""
    import numpy as np

    from kvae.runtime import Decoder

    decoder = Decoder(path)
    z = np.random.default_rng(0).standard_normal((batch, decoder.latent_dim), dtype=np.float32)
    for _ in range(5):  # warm-up (allocation, XNNPACK packing)
        decoder.decode(z)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 20:
        start = time.perf_counter()
        decoder.decode(z)
        times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1000
    return {"batch": batch, "calls": len(times), "ms_per_call": ms, "ms_per_sample": ms / batch,
            "p90_ms_per_call": float(np.percentile(times, 90) * 1000)}


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("numpy", "onnxruntime", "ai-edge-litert", "tensorflow", "keras"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def markdown(result: dict) -> str:
    """The README's table."""
    cold, lat = result["cold_start"], result["decode_latency"]
    tf = cold["tensorflow"]
    rows = ["| | import | first image (import + open + decode) | whole process | decode, batch 1 | decode, batch 64 (per sample) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, label in (("onnxruntime", "kvae.runtime + onnxruntime"), ("litert", "kvae.runtime + LiteRT")):
        c, l1, l64 = cold[name], lat[name]["1"], lat[name]["64"]
        rows.append(f"| {label} | {c['import_s'] * 1000:.0f} ms | {c['first_image_s'] * 1000:.0f} ms | "
                    f"{c['process_s'] * 1000:.0f} ms | {l1['ms_per_call']:.2f} ms | "
                    f"{l64['ms_per_call']:.1f} ms ({l64['ms_per_sample']:.2f} ms) |")
    rows.append(f"| TensorFlow + Keras (`decoder.keras`) | {tf['import_s']:.2f} s | {tf['first_image_s']:.2f} s | "
                f"{tf['process_s']:.2f} s | | |")
    r = result["ratios"]
    rows.append(f"\nTensorFlow takes {r['import_s_tensorflow_over_onnxruntime']:.0f}x (onnxruntime) / "
                f"{r['import_s_tensorflow_over_litert']:.0f}x (LiteRT) longer to import, and "
                f"{r['first_image_s_tensorflow_over_onnxruntime']:.0f}x / "
                f"{r['first_image_s_tensorflow_over_litert']:.0f}x longer to its first image.")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/runtime_latency.py", description=__doc__.split("\n\n")[1])
    parser.add_argument("run", nargs="?", default="runs/quickstart", help="exported run folder")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per cold-start number")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per latency number")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtime_latency.json"))
    args = parser.parse_args(argv)
    run = Path(args.run).resolve()
    export = run / "export"
    files = {"onnx": export / "decoder.onnx", "tflite": export / "decoder.tflite"}
    missing = [str(p) for p in [*files.values(), run / "decoder.keras"] if not p.is_file()]
    if missing:
        sys.exit(f"runtime_latency: missing {', '.join(missing)}; train and export first: "
                 f"python -m kvae.fit --out {args.run} && python export/to_onnx.py {args.run} && "
                 f"python export/to_tflite.py {args.run}")
    from kvae.runtime import Decoder

    latent_dim = Decoder(files["onnx"]).latent_dim

    load_before = os.getloadavg()
    print(f"runtime_latency: {run} (latent_dim {latent_dim}), {os.cpu_count()} CPUs, "
          f"{args.repeats} fresh processes per cold-start number")
    cold = {
        "onnxruntime": fresh_process(COLD_RUNTIME.format(package="onnxruntime", path=str(files["onnx"])),
                                     args.repeats),
        "litert": fresh_process(COLD_RUNTIME.format(package="ai_edge_litert.interpreter",
                                                    path=str(files["tflite"])), args.repeats),
        "tensorflow": fresh_process(COLD_TENSORFLOW.format(path=str(run / "decoder.keras"),
                                                           latent_dim=latent_dim), args.repeats),
    }
    latency = {name: {str(b): decode_latency(path, b, args.seconds) for b in (1, 64)}
               for name, path in (("onnxruntime", files["onnx"]), ("litert", files["tflite"]))}
    tf = cold["tensorflow"]
    ratios = {f"{key}_tensorflow_over_{name}": tf[key] / cold[name][key]
              for name in ("onnxruntime", "litert") for key in ("import_s", "first_image_s", "process_s")}

    print(f"\n{'cold start (median s)':<24}{'import':>10}{'first image':>14}{'process':>10}")
    for name, row in cold.items():
        label = "import tensorflow+keras" if name == "tensorflow" else f"kvae.runtime+{name}"
        print(f"{label:<24}{row['import_s']:>10.3f}{row['first_image_s']:>14.3f}{row['process_s']:>10.3f}")
    for name in ("onnxruntime", "litert"):
        print(f"  TensorFlow / {name}: import {ratios[f'import_s_tensorflow_over_{name}']:.0f}x, "
              f"first image {ratios[f'first_image_s_tensorflow_over_{name}']:.0f}x, "
              f"process {ratios[f'process_s_tensorflow_over_{name}']:.1f}x")
    print(f"\n{'decode latency':<24}{'ms/call b1':>12}{'ms/call b64':>13}{'ms/sample b64':>15}")
    for name, rows in latency.items():
        print(f"{name:<24}{rows['1']['ms_per_call']:>12.3f}{rows['64']['ms_per_call']:>13.3f}"
              f"{rows['64']['ms_per_sample']:>15.4f}")

    result = {
        "run": str(run), "latent_dim": latent_dim,
        "files": {name: {"path": str(p), "size": p.stat().st_size} for name, p in files.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()},
        "versions": versions(), "repeats": args.repeats,
        "cold_start": cold, "ratios": ratios, "decode_latency": latency,
        "notes": "cold_start: medians over fresh processes; import_s and first_image_s are timed "
                 "inside the process (first_image_s: import + open + one decode of batch 1), "
                 "process_s is the whole process wall time. decode_latency: Decoder.decode in one "
                 "process after 5 warm-up calls, default threads, XNNPACK on for LiteRT.",
    }
    print("\n" + markdown(result))
    from kvae.files import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
