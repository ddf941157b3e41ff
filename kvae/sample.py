"""python -m kvae.sample FILE_OR_RUN [--n 64] [--seed 0] [--out grid.png]

Draws images from an exported decoder without TensorFlow: z from the export's prior (prior.json,
kvae.prior: the model's learned P(z), or a sampling prior fitted to the training codes) when it
has one, else (or with `--prior standard`) z ~ N(0, I),
drawn with numpy's Generator (the same --seed gives the same images everywhere), decoded by
onnxruntime (`.onnx`) or LiteRT (`.tflite`). FILE_OR_RUN is a decoder file, an export folder or a run folder (RUN/export/
decoder.onnx, else decoder.tflite). `--out` ending in .png writes one grid image; .npy writes the
(n, H, W, C) float32 array. A conditional model needs `--label`: a class id or name (--n images
of it), or `all`: one row of --n images per class (`--n 8 --label all`: 8 of each).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from kvae.cli import ArgumentParser, cli_errors
from kvae.errors import KVAEError


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by kvae.sample and kvae.encode: which file to pick and how to run it."""
    parser.add_argument("--format", choices=("onnx", "tflite", "ort"), default=None,
                        help="for a folder: which file format to open (default: onnx if present; "
                             "ort: the .ort files of export/to_onnx.py --ort)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                        help="for a folder: which exported variant to open (default fp32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the runtime")
    parser.add_argument("--no-xnnpack", dest="xnnpack", action="store_false",
                        help="TFLite: run without the XNNPACK delegate")
    parser.add_argument("--verify", action="store_true",
                        help="check the file's sha256 against manifest.json first")


def cli_label(value: str | None, classes) -> str | int | None:
    """--label as the runtime takes it: a class name as given, else digits as a class id."""
    if value is not None and value not in classes and value.isdigit():
        return int(value)
    return value


def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python -m kvae.sample",
        description="Sample images from an exported decoder (.onnx or .tflite) without TensorFlow.",
        epilog="Example: python -m kvae.sample runs/quickstart --n 64 --seed 0 --out grid.png")
    parser.add_argument("model", metavar="FILE_OR_RUN",
                        help="decoder .onnx/.tflite file, export folder, or run folder")
    parser.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of eps (default: fresh images every time)")
    parser.add_argument("--out", default="grid.png", help="output .png grid or .npy array (default grid.png)")
    parser.add_argument("--cols", type=int, default=None, help="grid columns (default: square)")
    parser.add_argument("--label", default=None,
                        help="conditional models: the class (id or name) to draw, or `all` for "
                             "one row of --n images per class")
    parser.add_argument("--prior", choices=("fitted", "standard"), default=None,
                        help="where z comes from: fitted (the export's prior.json, the default "
                             "when it has one: the model's learned prior, or a Gaussian mixture "
                             "fitted to the training codes) or standard (N(0, I))")
    add_runtime_flags(parser)
    args = parser.parse_args(argv)
    with cli_errors("kvae.sample"):
        from kvae.runtime import Decoder, resolve

        if args.n < 1:
            raise KVAEError("--n must be a positive integer")
        if args.seed is not None and args.seed < 0:
            raise KVAEError("--seed must be a non-negative integer")
        if args.cols is not None and args.cols < 1:
            raise KVAEError("--cols must be a positive integer")
        out = Path(args.out)
        if out.suffix.lower() not in (".png", ".npy"):
            raise KVAEError(f"--out must end in .png or .npy, got {out}")
        if out.is_dir():
            raise KVAEError(f"--out {out} is a folder; give a file name such as {out / 'grid.png'}")
        path = resolve(args.model, "decoder", args.format, args.precision)
        decoder = Decoder(path, threads=args.threads, xnnpack=args.xnnpack, verify=args.verify)
        label, cols, n = args.label, args.cols, args.n
        if label == "all" and "all" not in decoder.classes:
            if not decoder.classes:
                raise KVAEError(f"{decoder.path} is not a conditional model: it takes no --label")
            label, cols = [c for c in range(decoder.num_classes) for _ in range(n)], cols or n
            n = len(label)
        else:
            label = cli_label(label, decoder.classes)
        start = time.perf_counter()
        images = decoder.sample(n, seed=args.seed, label=label, prior=args.prior)
        seconds = time.perf_counter() - start
        if out.suffix.lower() == ".npy":
            from kvae.files import atomic_path

            with atomic_path(out) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, images)
        else:
            from kvae.plots import save_grid

            save_grid(images, out, cols=cols)
        seed = "unseeded" if args.seed is None else f"seed {args.seed}"
        of = "" if args.label is None else f" of class {args.label}" if args.label != "all" else \
            f", {args.n} of each of {decoder.num_classes} classes"
        prior = args.prior or decoder.sampling_prior
        print(f"kvae.sample: {n} images{of} from {decoder.path} ({decoder.format}, {seed}, {prior} prior) in "
              f"{seconds * 1000:.1f} ms; wrote {out}")


if __name__ == "__main__":
    main()
