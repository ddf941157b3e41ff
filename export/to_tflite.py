"""python export/to_tflite.py RUN [--out DIR] [--quantize fp16 int8 | none] [--int8 best] [--fixed-batch 1]

Writes RUN/export/encoder.tflite and decoder.tflite (float32) plus encoder/decoder .fp16 and
.int8 variants, each checked against Keras before it gets its final name, and merges their
entries into RUN/export/manifest.json. The logic lives in kvae/export_tflite.py (what both
formats share: kvae/export.py).

It holds RUN's writer lock (kvae.runlock): with a fit or an evaluation of RUN running it ends at
once (exit code 2, the holder's pid); with another export of RUN running it waits for it.
SIGINT / SIGTERM end it with one line and exit code 130 / 143; a file that has not passed its
self-check never has its final name.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from kvae import export  # noqa: E402  (numpy only: --help stays fast)
from kvae.cli import cli_errors, require_train_stack  # noqa: E402
from kvae.errors import Interrupted, KVAEError, signals_interrupt  # noqa: E402
from kvae.export_tflite import export_tflite  # noqa: E402
from kvae.runlock import export_lock  # noqa: E402


def main(argv=None) -> None:
    parser = export.script_parser(
        "python export/to_tflite.py",
        "Export a run's encoder and decoder to TFLite (LiteRT), checked against Keras.")
    parser.add_argument("--fixed-batch", nargs="*", type=int, default=[1], metavar="N",
                        help="extra fixed-batch signatures batch<N>, the fast path for XNNPACK "
                             "(default: 1; give no value for none)")
    args = parser.parse_args(argv)
    prog = "export/to_tflite.py"
    require_train_stack(prog, export=True)  # one line naming kvae[train], before TensorFlow loads
    with cli_errors(prog), signals_interrupt():
        if any(b < 1 for b in args.fixed_batch):
            raise KVAEError(f"--fixed-batch takes positive batch sizes, got {args.fixed_batch} "
                            "(give no value for no fixed-batch signature)")
        try:
            with export_lock(args.run, prog):
                export_tflite(args.run, args.out, export.quantized(args.quantize),
                              tuple(args.fixed_batch), args.int8)
        except Interrupted as e:
            raise e.with_message(interrupted(args.out or Path(args.run) / "export")) from None


def interrupted(out) -> str:
    return (f"interrupted; the files under final names in {out} passed their self-check (its "
            "manifest.json lists them): run it again to write the rest")


if __name__ == "__main__":
    main()
