"""python -m kvae.encode FILE_OR_RUN IMAGES... [--out codes.npy]

Encodes image files with an exported encoder, without TensorFlow: each image -> the posterior
Q(z|X)'s mean `loc` (and standard deviation `scale`). FILE_OR_RUN is an encoder file, an export
folder or a run folder (RUN/export/encoder.onnx, else encoder.tflite). IMAGES are image files
(png, jpg, bmp, gif, webp) or folders of them (taken in sorted order); they are converted to the
model's channels (grayscale or RGB) and must have its size unless --resize is given. A
conditional model needs `--label` (a class id or name) for the images.

Output: `.npy` -> the (N, latent_dim) float32 array of `loc`, in the order the images were
given; `.npz` -> arrays `loc`, `scale` (N, latent_dim) and `files` (N,) (the image paths).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from kvae.cli import ArgumentParser, cli_errors
from kvae.errors import KVAEError
from kvae.sample import add_runtime_flags, cli_label

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def image_files(paths) -> list[Path]:
    """Files as given, folders expanded to their images in sorted order."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise KVAEError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise KVAEError(f"no such image file or folder: {p}")
    return files


def read_images(files, image_shape, resize: bool = False) -> np.ndarray:
    """Image files -> uint8 (N, H, W, C) in the model's channels and size."""
    from PIL import Image, UnidentifiedImageError

    h, w, c = image_shape
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(c)
    if mode is None:
        raise KVAEError(f"the encoder takes {c}-channel images; only 1, 3 or 4 channels can be read from files")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size != (w, h):
                    if not resize:
                        raise KVAEError(f"{f} is {im.size[0]}x{im.size[1]}; the encoder takes {w}x{h} "
                                        "images (resize them, or pass --resize)")
                    im = im.resize((w, h), Image.BILINEAR)
                images.append(np.asarray(im, dtype=np.uint8).reshape(h, w, c))
        except (UnidentifiedImageError, OSError) as e:
            raise KVAEError(f"cannot read image {f}: {e} (pass png, jpg, bmp, gif or webp files)") from None
    return np.stack(images)


def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python -m kvae.encode",
        description="Encode images with an exported encoder (.onnx or .tflite) without TensorFlow.",
        epilog="Example: python -m kvae.encode runs/quickstart digits/ --out codes.npy")
    parser.add_argument("model", metavar="FILE_OR_RUN",
                        help="encoder .onnx/.tflite file, export folder, or run folder")
    parser.add_argument("images", metavar="IMAGES", nargs="+", help="image files or folders")
    parser.add_argument("--out", default="codes.npy",
                        help=".npy (loc only) or .npz (loc, scale, files); default codes.npy")
    parser.add_argument("--label", default=None,
                        help="conditional models: the class (id or name) of every image")
    parser.add_argument("--resize", action="store_true",
                        help="resize images to the encoder's size instead of refusing them")
    add_runtime_flags(parser)
    args = parser.parse_args(argv)
    with cli_errors("kvae.encode"):
        from kvae.files import atomic_write_bytes
        from kvae.runtime import Encoder, resolve

        out = Path(args.out)
        if out.suffix.lower() not in (".npy", ".npz"):
            raise KVAEError(f"--out must end in .npy or .npz, got {out}")
        if out.is_dir():
            raise KVAEError(f"--out {out} is a folder; give a file name such as {out / 'codes.npy'}")
        encoder = Encoder(resolve(args.model, "encoder", args.format, args.precision),
                          threads=args.threads, xnnpack=args.xnnpack, verify=args.verify)
        files = image_files(args.images)
        x = read_images(files, encoder.image_shape, args.resize)
        loc, scale = encoder.encode(x, cli_label(args.label, encoder.classes))
        buffer = io.BytesIO()
        if out.suffix.lower() == ".npy":
            np.save(buffer, loc)
        else:
            np.savez(buffer, loc=loc, scale=scale, files=np.array([str(f) for f in files]))
        atomic_write_bytes(out, buffer.getvalue())
        print(f"kvae.encode: {len(files)} images -> {out} {tuple(loc.shape)} "
              f"({'loc' if out.suffix.lower() == '.npy' else 'loc, scale, files'}) with {encoder.path}")


if __name__ == "__main__":
    main()
