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


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _figure().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def manifold(decode, path: str | Path, n: int = 20) -> Path:
    """For a 2-D latent: decodes an n x n grid of Normal quantiles (Kingma & Welling 2014, fig. 4).

    Args:
      decode: z (B, 2) float32 -> x_mean (B, H, W, C).
    """
    from statistics import NormalDist

    q = np.array([NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, n)], np.float32)
    z = np.array([[a, b] for b in q[::-1] for a in q], np.float32)  # rows top to bottom: z2 falls
    return save_grid(decode(z), path, cols=n, upscale=1)


def traversals(decode, latent_dim: int, path: str | Path, dims: int = 8, steps: int = 9) -> Path:
    """Each row varies one latent dimension from -2.5 to 2.5 with the others at 0."""
    dims = min(dims, latent_dim)
    z = np.zeros((dims, steps, latent_dim), np.float32)
    for d in range(dims):
        z[d, :, d] = np.linspace(-2.5, 2.5, steps)
    return save_grid(decode(z.reshape(-1, latent_dim)), path, cols=steps)


def latent_scatter(loc: np.ndarray, labels, path: str | Path) -> Path:
    """Encoded validation points coloured by label: the codes themselves if 2-D, else their PCA."""
    plt = _figure()
    title = "Q(z|X) means of validation images"
    points = loc
    if loc.shape[1] > 2:
        centered = loc - loc.mean(0)
        _, s, vt = np.linalg.svd(centered, full_matrices=False)
        points = centered @ vt[:2].T
        share = (s[:2] ** 2).sum() / max((s ** 2).sum(), 1e-12)
        title += f" (PCA to 2-D, {share:.0%} of variance)"
    fig, ax = plt.subplots(figsize=(6, 5))
    colours = None if labels is None else np.asarray(labels)
    sc = ax.scatter(points[:, 0], points[:, 1], c=colours, s=6, alpha=0.8,
                    **({} if colours is None else {"cmap": "tab10"}))  # a cmap without labels warns
    if colours is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("z1" if loc.shape[1] == 2 else "PC 1")
    ax.set_ylabel("z2" if loc.shape[1] == 2 else "PC 2")
    return _save_figure(fig, path)


def training_curves(history_csv: str | Path, path: str | Path) -> Path:
    """Loss, reconstruction and KL per epoch, train and validation, from history.csv."""
    import csv

    with open(history_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    plt = _figure()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = [int(r["epoch"]) for r in rows]
    for ax, key in zip(axes, ("loss", "reconstruction_loss", "kl_loss")):
        for prefix, style in (("", "-"), ("val_", "--")):
            if prefix + key in rows[0]:
                ax.plot(epochs, [float(r[prefix + key]) for r in rows], style,
                        label="validation" if prefix else "train")
        ax.set_title(key.replace("_", " ") + " (nats)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend()
    return _save_figure(fig, path)
