"""The importance-weighted log-likelihood estimate, in numpy: one definition for kvae.export's
paired NLL changes, kvae.runtime's `VAE.log_likelihood` and kvae.evaluate.

    log P(X) ~= log (1/k) sum_i P(X|z_i) P(z_i) / Q(z_i|X),   z_i = loc + scale * eps_i

(Burda, Grosse & Salakhutdinov 2015, "Importance Weighted Autoencoders", eq. 8), with
Q(z|X) = N(loc, diag scale^2) and P(z) = N(0, I) or the model's learned mixture (`prior`, a
kvae.prior dict), summed in float64 with a log-sum-exp.

The clip rule, for a Bernoulli decoder that outputs probabilities p: p is clipped to the
resolution of the file that computed it, and only in the term that needs it (p_range[0] in
log p, p_range[1] in log(1 - p)). float32 outputs: [2^-149, 1 - 2^-25] (float32 rounds p within
2^-25 of 1 to exactly 1.0), which equals the logits formula except where float32 rounds p to
exactly 0 or 1 and the pixel disagrees, where it is an upper bound on the loss. A full-integer
int8 decoder's p lie on a grid of about 1/256: its 0 stands for any p below half a step, so it
clips at 2^-9 (at 2^-149 such a pixel would cost 103 nats). kvae.evaluate scores the Keras
decoder's logits (model.reconstruction_nll, the training loss), which needs no clip.

numpy only: kvae.runtime imports this without TensorFlow.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

LOG_2PI = math.log(2 * math.pi)
P_FLOAT32 = (float(np.finfo(np.float32).smallest_subnormal), 1.0 - 2.0 ** -25)
P_INT8 = (2.0 ** -9, 1.0 - 2.0 ** -9)


def p_range(precision: str = "fp32", quantization: str | None = None) -> tuple[float, float]:
    """The clip rule: the probabilities a file with this precision can tell apart.

    Dynamic-range int8 files compute their output in float32; full-integer (`static`) ones
    output an int8 grid.
    """
    return P_INT8 if precision == "int8" and quantization not in (None, "dynamic") else P_FLOAT32


def logsumexp(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """log sum exp over `axis`, stable, and -inf (not NaN) where every term is -inf."""
    m = np.max(a, axis=axis)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):  # log(0) = -inf is the answer there, not a problem
        return m_safe + np.log(np.sum(np.exp(a - np.expand_dims(m_safe, axis)), axis=axis))


def log_prior_over_q(loc: np.ndarray, scale: np.ndarray, eps: np.ndarray,
                     prior: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """z = loc + scale * eps and log P(z) - log Q(z|X), in float64.

    Args:
      loc, scale: (B, D) the posterior Q(z|X).
      eps: (k, B, D) standard normal draws.
      prior: the model's P(z) as a kvae.prior mixture (weights, loc, scale), or None: N(0, I).

    Returns:
      z (k, B, D) float64 and (k, B) log P(z) - log Q(z|X).
    """
    loc, scale, eps = (np.asarray(a, np.float64) for a in (loc, scale, eps))
    z = loc + scale * eps
    if prior is None:
        log_prior = np.sum(-0.5 * z ** 2 - 0.5 * LOG_2PI, -1)
    else:
        from kvae.prior import log_density

        log_prior = log_density(prior, z.reshape(-1, z.shape[-1])).reshape(z.shape[:-1])
    log_q = np.sum(-0.5 * eps ** 2 - np.log(scale) - 0.5 * LOG_2PI, -1)
    return z, log_prior - log_q


def log_px(x: np.ndarray, x_mean: np.ndarray, likelihood: str, sigma: float | None = None,
           p_range: tuple[float, float] = P_FLOAT32) -> np.ndarray:
    """log P(X|z) summed over the last axis (pixels); x and x_mean broadcast.

    Args:
      x: (..., P) images in [0, 1] (binarized for a Bernoulli likelihood).
      x_mean: (..., P) the decoder's output: Bernoulli probabilities or the Gaussian mean.
      likelihood: `bernoulli` or `gaussian` (N(x; x_mean, sigma^2 I)).
      p_range: the clip rule (see the module docstring; `p_range()`).
    """
    x, x_mean = np.asarray(x, np.float64), np.asarray(x_mean, np.float64)
    if likelihood == "bernoulli":
        lo, hi = p_range
        return np.sum(x * np.log(np.maximum(x_mean, lo)) + (1 - x) * np.log1p(-np.minimum(x_mean, hi)), -1)
    return np.sum(-0.5 * ((x - x_mean) / sigma) ** 2 - math.log(sigma) - 0.5 * LOG_2PI, -1)


def nll(x: np.ndarray, loc: np.ndarray, scale: np.ndarray, eps: np.ndarray,
        decode: Callable[[np.ndarray], np.ndarray], likelihood: str = "bernoulli",
        sigma: float | None = 0.1, p_range: tuple[float, float] = P_FLOAT32,
        chunk: int = 2048, y: np.ndarray | None = None, prior: dict | None = None) -> np.ndarray:
    """Per-image importance-weighted -log P(X) (-log P(X|y) with `y`), in nats.

    The same (loc, scale, eps) for two decoders make their difference a paired estimate (its
    noise is far below each NLL's): kvae.export's nll_delta.

    Args:
      x: (N, H, W, C) images in [0, 1] (binarized for a Bernoulli likelihood).
      loc, scale: (N, D) the posterior Q(z|X).
      eps: (k, N, D) standard normal draws.
      decode: z (B, D) float32 -> x_mean (B, H, W, C), the decoder under test; with `y`,
        decode(z, y) with each z's condition (B, num_classes).
      likelihood, sigma, p_range: as in `log_px`.
      chunk: at most this many z per decode call (bounds memory: chunk decoded images).
      y: (N, num_classes) the condition of each image, for a conditional model (-log P(X|y)).
      prior: the model's learned P(z) (a kvae.prior mixture), or None: N(0, I).

    Returns:
      (N,) float64 NLL per image.
    """
    k, n, d = eps.shape
    z, log_ratio = log_prior_over_q(loc, scale, eps, prior)  # (k, N, D), (k, N)
    flat = z.astype(np.float32).reshape(k * n, d)
    x_flat = np.asarray(x, np.float64).reshape(n, -1)
    lp = np.empty(k * n)
    for start in range(0, k * n, chunk):
        rows = np.arange(start, min(start + chunk, k * n))
        decoded = decode(flat[rows]) if y is None else decode(flat[rows], y[rows % n])
        mean = np.asarray(decoded).reshape(len(rows), -1)
        lp[rows] = log_px(x_flat[rows % n], mean, likelihood, sigma, p_range)
    return -(logsumexp(lp.reshape(k, n) + log_ratio) - math.log(k))
