"""python export/to_onnx.py RUN [--out DIR] [--quantize fp16 int8 | none] [--int8 best]

Writes RUN/export/encoder.onnx and decoder.onnx (float32, opset 17, dynamic batch `batch`) plus
encoder/decoder .fp16 and .int8 variants, each checked with onnx.checker and against Keras in
onnxruntime before it gets its final name, and merges their entries into
RUN/export/manifest.json. The logic lives in kvae/export.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from kvae import export  # noqa: E402  (numpy only: --help stays fast)
from kvae.errors import cli_errors  # noqa: E402


def main(argv=None) -> None:
    parser = export.script_parser(
        "python export/to_onnx.py",
        "Export a run's encoder and decoder to ONNX (opset 17), checked against Keras.")
    args = parser.parse_args(argv)
    with cli_errors("export/to_onnx.py"):
        export.export_onnx(args.run, args.out, export.quantized(args.quantize), args.int8)


if __name__ == "__main__":
    main()
