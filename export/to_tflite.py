"""python export/to_tflite.py RUN [--out DIR] [--quantize fp16 int8 | none] [--int8 best] [--fixed-batch 1]

Writes RUN/export/encoder.tflite and decoder.tflite (float32) plus encoder/decoder .fp16 and
.int8 variants, each checked against Keras before it gets its final name, and merges their
entries into RUN/export/manifest.json. The logic lives in kvae/export.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from kvae import export  # noqa: E402  (numpy only: --help stays fast)
from kvae.errors import KVAEError, cli_errors  # noqa: E402


def main(argv=None) -> None:
    parser = export.script_parser(
        "python export/to_tflite.py",
        "Export a run's encoder and decoder to TFLite (LiteRT), checked against Keras.")
    parser.add_argument("--fixed-batch", nargs="*", type=int, default=[1], metavar="N",
                        help="extra fixed-batch signatures batch<N>, the fast path for XNNPACK "
                             "(default: 1; give no value for none)")
    args = parser.parse_args(argv)
    with cli_errors("export/to_tflite.py"):
        if any(b < 1 for b in args.fixed_batch):
            raise KVAEError(f"--fixed-batch takes positive batch sizes, got {args.fixed_batch} "
                            "(give no value for no fixed-batch signature)")
        export.export_tflite(args.run, args.out, export.quantized(args.quantize),
                             tuple(args.fixed_batch), args.int8)


if __name__ == "__main__":
    main()
