"""python export/to_onnx.py RUN [--out DIR] [--quantize fp16 int8 | none] [--int8 best] [--ort]

Writes RUN/export/encoder.onnx and decoder.onnx (float32, opset 17, dynamic batch `batch`) plus
encoder/decoder .fp16 and .int8 variants, each checked with onnx.checker and against Keras in
onnxruntime before it gets its final name, and merges their entries into
RUN/export/manifest.json. `--ort` also writes each file in onnxruntime's own format
(`<half>[.<precision>].ort`, for onnxruntime's reduced mobile builds), checked the same way, and
`required_operators_and_types.config` for such a build. The logic lives in kvae/export_onnx.py
(what both formats share: kvae/export.py).

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
from kvae.errors import Interrupted, signals_interrupt  # noqa: E402
from kvae.export_onnx import export_onnx  # noqa: E402
from kvae.runlock import export_lock  # noqa: E402


def main(argv=None) -> None:
    parser = export.script_parser(
        "python export/to_onnx.py",
        "Export a run's encoder and decoder to ONNX (opset 17), checked against Keras.")
    parser.add_argument("--ort", action="store_true",
                        help="also write each file in onnxruntime's ORT format (.ort, for reduced "
                             "mobile builds of onnxruntime; checked against Keras like the .onnx "
                             "files) and required_operators_and_types.config for such a build")
    args = parser.parse_args(argv)
    prog = "export/to_onnx.py"
    require_train_stack(prog, export=True)  # one line naming kvae[train], before TensorFlow loads
    with cli_errors(prog), signals_interrupt():
        try:
            with export_lock(args.run, prog):
                export_onnx(args.run, args.out, export.quantized(args.quantize), args.int8,
                            ort=args.ort)
        except Interrupted as e:
            raise e.with_message(interrupted(args.out or Path(args.run) / "export")) from None


def interrupted(out) -> str:
    return (f"interrupted; the files under final names in {out} passed their self-check (its "
            "manifest.json lists them): run it again to write the rest")


if __name__ == "__main__":
    main()
