"""Image grids as PNG files (numpy + Pillow only: the TensorFlow-free runtime uses them too)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from kvae.files import atomic_write_bytes


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] -> one (rows*H', cols*W', C) uint8 image with white gaps."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0, 1)
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = image
    return (canvas * 255 + 0.5).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    image = image[..., 0] if image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(images: np.ndarray, path: str | Path, cols: int | None = None, upscale: int = 2) -> Path:
    """Writes `images` (N, H, W, C) in [0, 1] as one PNG grid (atomically)."""
    atomic_write_bytes(path, png_bytes(grid(images, cols, upscale=upscale)))
    return Path(path)


def interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[a0, b0, a1, b1, ...]: inputs beside their reconstructions."""
    out = np.empty((2 * len(a), *a.shape[1:]), np.float32)
    out[0::2], out[1::2] = a, b
    return out
