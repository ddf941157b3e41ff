"""python export/report.py RUN [--check] [--latency]

Prints the parity / size / quality table of RUN/export/manifest.json as Markdown (the table in
the README comes from this command). TensorFlow-free: it reads the manifest. `--check` also
recomputes each file's sha256 and fails if a file changed since its export. `--latency` adds a
table of ms per call at batch 1 and 64 (LiteRT with XNNPACK: the dynamic `serving_default` and
the fixed `batch1` signature; onnxruntime), 1 thread, best of 5 rounds.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from kvae import contract  # noqa: E402
from kvae.cli import ArgumentParser, cli_errors  # noqa: E402
from kvae.errors import KVAEError  # noqa: E402

ORDER = {"encoder": 0, "decoder": 1, "tflite": 0, "onnx": 1, "fp32": 0, "fp16": 1, "int8": 2}


def read_manifest(folder: Path) -> dict:
    """RUN or RUN/export -> the manifest dict."""
    for path in (folder / "export", folder):
        try:
            manifest = contract.read_manifest(path)
        except ValueError as e:
            raise KVAEError(str(e)) from None
        if manifest:
            return manifest
    raise KVAEError(f"no manifest.json in {folder}/export or {folder}: export the run first "
                    f"(python export/to_tflite.py {folder}; python export/to_onnx.py {folder})")


def _diffs(values: dict) -> str:
    return ", ".join(f"{k} {v:.1e}" for k, v in values.items())


def table(manifest: dict) -> str:
    """The Markdown table: one row per file, encoder before decoder, TFLite before ONNX."""
    files = manifest["files"]
    fp32_size = {(e["half"], e["format"]): e["size"] for e in files.values() if e["precision"] == "fp32"}
    rows = ["| file | precision | size | vs fp32 | max abs diff vs Keras | mean abs diff | "
            "validation NLL change (nats) |",
            "| --- | --- | ---: | ---: | --- | --- | ---: |"]
    nll = None
    for name, e in sorted(files.items(), key=lambda kv: (ORDER[kv[1]["half"]], ORDER[kv[1]["format"]],
                                                          ORDER[kv[1]["precision"]])):
        base = fp32_size.get((e["half"], e["format"]))
        share = f"{100 * e['size'] / base:.0f}%" if base else "-"
        precision = e["precision"] + (f" ({e['quantization']})" if e.get("quantization") else "")
        delta = "-"
        if "nll_delta" in e:
            se = e["nll"].get("delta_se")
            delta = f"{e['nll_delta']:+.3f}" + (f" ± {se:.3f}" if se is not None else "")
            nll = e["nll"]
        rows.append(f"| `{name}` | {precision} | {e['size'] / 1e6:.2f} MB | {share} | "
                    f"{_diffs(e['parity']['max_abs_diff'])} | {_diffs(e['parity']['mean_abs_diff'])} | "
                    f"{delta} |")
    shape = "x".join(str(d) for d in manifest["image_shape"])
    notes = [f"latent_dim {manifest['latent_dim']}, images {shape}, {manifest['likelihood']} "
             f"likelihood, kvae {manifest['kvae_version']}."]
    if nll:
        notes.append(f"NLL change: validation IWAE NLL (n={nll['n']}, k={nll['k']}) with the variant "
                     f"minus float32 Keras ({nll['fp32']:.2f} nats), paired eps; ± is its standard "
                     "error. Encoder rows: the variant's posterior as the proposal, float32 decoder.")
    parity = {e["half"]: e["parity"]["inputs"] for e in files.values()}
    notes += [f"Parity inputs ({half}): {text}." for half, text in sorted(parity.items())]
    return "\n".join(rows) + "\n\n" + "\n".join("- " + note for note in notes)


def check_files(folder: Path, manifest: dict) -> None:
    export = folder / "export" if (folder / "export" / "manifest.json").is_file() else folder
    for name, e in manifest["files"].items():
        path = export / name
        if not path.is_file():
            raise KVAEError(f"{path} is listed in the manifest but missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != e["sha256"]:
            raise KVAEError(f"{path} changed since its export (sha256 differs): export it again")


def _ms_per_call(call, inputs: np.ndarray, rounds: int = 5, budget: float = 0.2) -> float:
    """Best-of-`rounds` mean time of call(inputs), in ms (best-of: robust on a shared machine)."""
    call(inputs)
    n = 1
    while True:  # calls per round: enough for ~budget seconds
        start = time.perf_counter()
        for _ in range(n):
            call(inputs)
        elapsed = time.perf_counter() - start
        if elapsed > budget / 4 or n >= 4096:
            break
        n *= 4
    n = max(1, int(n * budget / max(elapsed, 1e-9)))
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            call(inputs)
        best = min(best, (time.perf_counter() - start) / n)
    return 1000 * best


def latency_table(export: Path, manifest: dict, rounds: int = 5, budget: float = 0.2) -> str:
    """ms per call of every file at batch 1 and 64 (dynamic batch and fixed signatures), 1 thread."""
    rows = ["| file | batch 1, dynamic | batch 1, `batch1` | batch 64, dynamic | batch 64, `batch64` |",
            "| --- | ---: | ---: | ---: | ---: |"]
    rng = np.random.default_rng(0)
    latent, image = manifest["latent_dim"], manifest["image_shape"]
    for name, e in sorted(manifest["files"].items(), key=lambda kv: (
            ORDER[kv[1]["half"]], ORDER[kv[1]["format"]], ORDER[kv[1]["precision"]])):
        shape = image if e["half"] == "encoder" else [latent]
        input_name = e["inputs"][0]["name"]
        data = {b: rng.random((b, *shape), dtype=np.float32) for b in (1, 64)}
        cells = []
        if e["format"] == "tflite":
            from ai_edge_litert.interpreter import Interpreter

            for signature, batch in (("serving_default", 1), ("batch1", 1), ("serving_default", 64),
                                     ("batch64", 64)):
                if signature not in e.get("signatures", {"serving_default": "dynamic"}):
                    cells.append("-")
                    continue
                interpreter = Interpreter(model_path=str(export / name), num_threads=1)
                runner = interpreter.get_signature_runner(signature)
                ms = _ms_per_call(lambda v: runner(**{input_name: v}), data[batch], rounds, budget)
                cells.append(f"{ms:.3f}")
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(export / name), options, providers=["CPUExecutionProvider"])
            call = lambda v: session.run(None, {input_name: v})  # noqa: E731
            cells = [f"{_ms_per_call(call, data[b], rounds, budget):.3f}" for b in (1, 64)]
            cells = [cells[0], "-", cells[1], "-"]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows) + f"\n\nms per call, 1 thread, best of {rounds} rounds."


def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python export/report.py",
        description="Print the parity/size/NLL table of a run's exported files (Markdown).")
    parser.add_argument("run", help="run folder (or its export folder)")
    parser.add_argument("--check", action="store_true", help="also verify each file's sha256")
    parser.add_argument("--latency", action="store_true",
                        help="also measure ms per call at batch 1 and 64 (LiteRT, onnxruntime; 1 thread)")
    args = parser.parse_args(argv)
    with cli_errors("export/report.py"):
        folder = Path(args.run)
        manifest = read_manifest(folder)
        if not manifest.get("files"):
            raise KVAEError(f"the manifest of {folder} lists no files: export the run first")
        if args.check:
            check_files(folder, manifest)
        print(table(manifest))
        if args.latency:
            export = folder / "export" if (folder / "export" / "manifest.json").is_file() else folder
            print("\n" + latency_table(export, manifest))


if __name__ == "__main__":
    main()
