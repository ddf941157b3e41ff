"""What users hand kvae.runtime, checked and converted: latents, images, labels and seeds.

Every check raises RuntimeInputError with one line that says what is wrong and what to pass;
numpy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvae.sessions import RuntimeInputError, first_line


def condition(label, n: int, classes: tuple[str, ...], path) -> np.ndarray | None:
    """`label` -> the one-hot y (n, len(classes)) of a conditional model (see _Half.condition);
    None for an unconditional model (no classes), which must get no label."""
    if not classes:
        if label is not None:
            raise RuntimeInputError(f"{path} is not a conditional model: it takes no label")
        return None
    if label is None:
        raise RuntimeInputError(f"{path} is a conditional model: pass a label (a class "
                                f"id 0..{len(classes) - 1} or a name: {_names(classes)})")
    if isinstance(label, np.ndarray) and label.dtype.kind == "f" and label.ndim == 2:
        if label.shape != (n, len(classes)):
            raise RuntimeInputError(f"y must have shape ({n}, {len(classes)}); got {label.shape}")
        return _as_float32(label, "y")
    if isinstance(label, np.ndarray) and label.ndim == 0:
        label = label.item()
    labels = list(label) if isinstance(label, (list, tuple, np.ndarray)) else [label]
    if len(labels) == 1:
        labels = labels * n
    if len(labels) != n:
        raise RuntimeInputError(f"give one label, or one per row ({n}); got {len(labels)}")
    ids = np.empty(n, np.int64)
    for i, value in enumerate(labels):
        if isinstance(value, str) and value in classes:
            ids[i] = classes.index(value)
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and \
                0 <= value < len(classes):
            ids[i] = int(value)
        else:
            raise RuntimeInputError(f"unknown label {_first_line_repr(value)}: use a class id "
                                    f"0..{len(classes) - 1} or a name: {_names(classes)}")
    return np.eye(len(classes), dtype=np.float32)[ids]


def check_output(values: np.ndarray, what: str, path: Path, context: str, advice: str) -> None:
    """NaN or inf out of a model (z near the float32 limit, or a broken file) is an error, never
    a silent result."""
    if not np.all(np.isfinite(values)):
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise RuntimeInputError(f"{path} gave {bad} NaN or infinite value(s) of {what} {context}: "
                                f"{advice}")


def generator(seed) -> np.random.Generator:
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError):  # numpy's message may quote the seed itself, newlines and all
        raise RuntimeInputError("seed must be a non-negative integer or a numpy Generator, got "
                                f"{_first_line_repr(seed)}") from None


def _names(classes, limit: int = 12) -> str:
    """The class names for a message: all of them, or the first `limit` and how many more."""
    shown = ", ".join(classes[:limit])
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")


def _first_line_repr(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: one line (repr escapes newlines) for any input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def as_array(value, what: str) -> np.ndarray:
    """np.asarray, with ragged or unconvertible input turned into a RuntimeInputError."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:  # e.g. rows of different lengths
        raise RuntimeInputError(f"{what} must be an array of numbers with rows of equal length: "
                                f"{first_line(e)}") from None


def _as_float32(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.kind not in "fiub":
        raise RuntimeInputError(f"{what} must be a real numeric array; got dtype {a.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise RuntimeInputError(f"{what} has {bad} NaN or infinite value(s) (or values too large "
                                "for float32)")
    return a


def check_latents(z, latent_dim: int) -> np.ndarray:
    """z -> float32 (B, latent_dim), or a RuntimeInputError that says what is wrong."""
    z = as_array(z, "z")
    if z.ndim != 2 or z.shape[1] != latent_dim:
        raise RuntimeInputError(f"z must have shape (batch, {latent_dim}) (this decoder's latent size "
                                f"is {latent_dim}); got {z.shape}")
    return _as_float32(z, "z")


def check_images(x, image_shape) -> tuple[np.ndarray, bool]:
    """Images -> (float32 (B, H, W, C) in [0, 1], whether one image was given)."""
    x = as_array(x, "images")
    h, w, c = image_shape
    single = False
    if x.shape == (h, w, c):
        x, single = x[None], True
    elif c == 1 and x.shape == (h, w):
        x, single = x[None, ..., None], True
    elif c == 1 and x.ndim == 3 and x.shape[1:] == (h, w):
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (h, w, c):
        raise RuntimeInputError(f"images must have shape (batch, {h}, {w}, {c}) or ({h}, {w}, {c}); "
                                f"got {x.shape}")
    if x.dtype.kind in "iu":  # integer pixels: 0..255 levels
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise RuntimeInputError(f"integer images must hold 0..255; got values in [{lo}, {hi}]")
        return x.astype(np.float32) / 255.0, single
    x = _as_float32(x, "images")
    if x.size:
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise RuntimeInputError(f"float images must lie in [0, 1]; got values in [{lo:g}, {hi:g}] "
                                    "(divide 0..255 pixels by 255, or pass uint8)")
    return x, single
