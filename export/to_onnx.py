"""python export/to_onnx.py RUN [--out DIR] [--quantize fp16 int8 | none]

Writes RUN/export/encoder.onnx and decoder.onnx (float32, opset 17, dynamic batch `batch`) plus
encoder/decoder .fp16 and .int8 variants, each checked with onnx.checker and against Keras in
onnxruntime before it gets its final name, and merges their entries into
RUN/export/manifest.json. The logic lives in kvae/export.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from kvae.errors import ArgumentParser, cli_errors  # noqa: E402


def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python export/to_onnx.py",
        description="Export a run's encoder and decoder to ONNX (opset 17), checked against Keras.")
    parser.add_argument("run", help="run folder written by python -m kvae.fit")
    parser.add_argument("--out", help="output folder (default: RUN/export)")
    parser.add_argument("--quantize", nargs="+", choices=("fp16", "int8", "all", "none"),
                        default=["all"], help="quantized variants to write besides float32 "
                        "(default: all = fp16 int8; none = float32 only)")
    args = parser.parse_args(argv)
    with cli_errors("export/to_onnx.py"):
        from kvae import export

        quantize = export.QUANTIZED if "all" in args.quantize else tuple(
            q for q in args.quantize if q != "none")
        export.export_onnx(args.run, args.out, quantize)


if __name__ == "__main__":
    main()
