"""The tests' own estimators, written with scipy independently of kvae.iwae and kvae.prior."""

from __future__ import annotations

import math

import numpy as np

from kvae import iwae


def mixture_log_density(prior, z):
    """log sum_c w_c N(z; loc_c, diag scale_c^2) of a kvae.prior mixture (prior.json's dict, or
    Posterior.mixture_prior's), z (..., D) -> (...): the components on a last axis."""
    from scipy.special import logsumexp
    from scipy.stats import norm

    w, mu, sd = (np.float64(prior[key]) for key in ("weights", "loc", "scale"))
    return logsumexp(np.log(w) + norm.logpdf(np.float64(z)[..., None, :], mu, sd).sum(-1), axis=-1)


def reference_nll(x, loc, scale, eps, decode, likelihood="bernoulli", sigma=0.1, p_range=iwae.P_FLOAT32,
                  prior=None):
    """The tests' own importance-weighted -log P(X) per image (scipy's densities and logsumexp).

    Same definition as kvae.iwae.nll (z = loc + scale * eps, Bernoulli probabilities clipped by
    the file's p_range in the term that needs it), written independently: log Q is scored at z,
    log P(z) under N(0, I) or under `prior`, the model's learned mixture (prior.json's dict).
    """
    from scipy.special import logsumexp
    from scipy.stats import norm

    k, n, d = eps.shape
    loc, scale = np.float64(loc), np.float64(scale)
    z = loc + scale * eps  # (k, N, D)
    log_q = norm.logpdf(z, loc, scale).sum(-1)
    if prior is None:
        log_prior = norm.logpdf(z).sum(-1)
    else:
        log_prior = mixture_log_density(prior, z)
    mean = np.float64(decode(np.float32(z).reshape(k * n, d))).reshape(k, n, -1)
    xr = np.float64(x).reshape(1, n, -1)
    if likelihood == "bernoulli":
        log_px = (xr * np.log(np.maximum(mean, p_range[0])) + (1 - xr) * np.log(1 - np.minimum(mean, p_range[1]))).sum(-1)
    else:
        log_px = norm.logpdf(xr, mean, sigma).sum(-1)
    return -(logsumexp(log_px + log_prior - log_q, axis=0) - math.log(k))
