"""python export/to_tflite.py RUN [--out DIR] [--quantize fp16 int8 | none] [--fixed-batch 1]

Writes RUN/export/encoder.tflite and decoder.tflite (float32) plus encoder/decoder .fp16 and
.int8 variants, each checked against Keras before it gets its final name, and merges their
entries into RUN/export/manifest.json. The logic lives in kvae/export.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from kvae.errors import ArgumentParser, KVAEError, cli_errors  # noqa: E402


def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python export/to_tflite.py",
        description="Export a run's encoder and decoder to TFLite (LiteRT), checked against Keras.")
    parser.add_argument("run", help="run folder written by python -m kvae.fit")
    parser.add_argument("--out", help="output folder (default: RUN/export)")
    parser.add_argument("--quantize", nargs="+", choices=("fp16", "int8", "all", "none"),
                        default=["all"], help="quantized variants to write besides float32 "
                        "(default: all = fp16 int8; none = float32 only)")
    parser.add_argument("--fixed-batch", nargs="*", type=int, default=[1], metavar="N",
                        help="extra fixed-batch signatures batch<N>, the fast path for XNNPACK "
                             "(default: 1; give no value for none)")
    args = parser.parse_args(argv)
    with cli_errors("export/to_tflite.py"):
        if any(b < 1 for b in args.fixed_batch):
            raise KVAEError(f"--fixed-batch takes positive batch sizes, got {args.fixed_batch} "
                            "(give no value for no fixed-batch signature)")
        from kvae import export

        quantize = export.QUANTIZED if "all" in args.quantize else tuple(
            q for q in args.quantize if q != "none")
        export.export_tflite(args.run, args.out, quantize, tuple(args.fixed_batch))


if __name__ == "__main__":
    main()
