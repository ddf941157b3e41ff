"""python export/report.py RUN [--check]

Prints the parity / size / quality table of RUN/export/manifest.json as Markdown (the table in
docs/export.md comes from this command). TensorFlow-free: it reads the manifest. `--check` also
recomputes each file's sha256 and fails if a file changed since its export. Latency is measured
by the one latency benchmark, bench/latency.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

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
        if contract.sha256(path) != e["sha256"]:
            raise KVAEError(f"{path} changed since its export (sha256 differs): export it again")


def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python export/report.py",
        description="Print the parity/size/NLL table of a run's exported files (Markdown).")
    parser.add_argument("run", help="run folder (or its export folder)")
    parser.add_argument("--check", action="store_true", help="also verify each file's sha256")
    args = parser.parse_args(argv)
    with cli_errors("export/report.py"):
        folder = Path(args.run)
        manifest = read_manifest(folder)
        if not manifest.get("files"):
            raise KVAEError(f"the manifest of {folder} lists no files: export the run first")
        if args.check:
            check_files(folder, manifest)
        print(table(manifest))


if __name__ == "__main__":
    main()
