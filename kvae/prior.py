"""A prior for sampling fitted to the training codes: a Gaussian mixture (numpy only).

A VAE's samples come from z ~ P(z) = N(0, I), but the decoder only ever learned from codes of
training images, and their aggregate does not fill N(0, I): it leaves holes, and decoded holes
are blurs that read as no digit. Ghosh et al. 2019 ("From Variational to Deterministic
Autoencoders", section 4, "ex-post density estimation") fit a Gaussian mixture with diagonal
covariances to the posterior means of the training images after training and sample z from it.
kvae does the same at the end of `kvae.fit` (`--prior-components K`, 0 = off): `prior.json` in
the run folder, copied next to the exported decoder and named in its manifest ("prior").

Such a prior is for sampling only: the model, its training loss and every NLL keep the model's
own P(z) = N(0, I). A model that learns its prior (`--prior-mixture K`, the default: a mixture
trained with the model, kvae.layers.Posterior) writes that prior to prior.json instead, marked
`"model_prior": true`: it is then both what samples come from and the P(z) of every NLL
(`model_prior`). `kvae.runtime` samples from prior.json when present (prior="fitted"), or from
N(0, I) with prior="standard".

prior.json: {"kind": "gaussian-mixture-diag", "weights": [K], "loc": [K][latent_dim],
"scale": [K][latent_dim], "fitted_on": str, "model_prior": bool (absent: false),
"source": {"encoder.keras": sha256}} (the encoder trained or fitted with it: kvae.export refuses
a prior from another training).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvae import contract

FILE = contract.PRIOR
KIND = "gaussian-mixture-diag"
PRIORS = ("fitted", "standard")  # what runtime sampling takes: the fitted prior, or N(0, I)
MIN_SCALE = 1e-3  # floor on a component's standard deviation (a component of one code)


def fit(codes: np.ndarray, components: int, seed: int = 0, restarts: int = 1,
        iterations: int = 100, tol: float = 1e-5) -> dict:
    """A diagonal Gaussian mixture fitted to `codes` (N, D) by EM from k-means++ starts.

    With `restarts` > 1 the fit of the highest likelihood is kept: a start can end with two
    components in one cluster, which matters for a few components, little for kvae.fit's many
    (one start, as scikit-learn's GaussianMixture makes by default).

    Returns the prior as a dict (`write` saves it): weights (K,), loc and scale (K, D).
    """
    x = np.asarray(codes, np.float64)
    k = min(int(components), len(x))
    if k < 1:
        raise ValueError(f"components must be >= 1, got {components}")
    rng = np.random.default_rng(seed)
    fits = [_em(x, k, rng, iterations, tol) for _ in range(max(1, restarts))]
    log_likelihood, weights, loc, var = max(fits, key=lambda fit: fit[0])
    return {"kind": KIND, "weights": _float32_list(weights), "loc": _float32_list(loc),
            "scale": _float32_list(np.sqrt(var))}


def learned(mixture: dict, fitted_on: str) -> dict:
    """prior.json's dict for a model's learned P(z) (weights, loc, scale: kvae.layers.Posterior's
    `mixture_prior`)."""
    return {"kind": KIND, **{key: _float32_list(mixture[key]) for key in ("weights", "loc", "scale")},
            "fitted_on": fitted_on, "model_prior": True}


def model_prior(prior: dict | None) -> dict | None:
    """`prior` if it is the model's own P(z) (a learned prior), else None: P(z) = N(0, I)."""
    return prior if prior is not None and prior.get("model_prior") is True else None


def _float32_list(a: np.ndarray) -> list:
    """a as nested lists of the shortest decimals that round-trip float32, the precision every
    runtime samples in (a third of the JSON of float64 digits)."""
    a = np.asarray(a, np.float32)
    if a.ndim > 1:
        return [_float32_list(row) for row in a]
    return [float(np.format_float_positional(v, unique=True)) for v in a]


def _em(x, k, rng, iterations, tol):
    """(mean log-likelihood, weights, loc, var) of one EM run from a k-means++ start."""
    n = len(x)
    loc = _kmeans_plus_plus(x, k, rng)
    var = np.tile(x.var(axis=0) + MIN_SCALE ** 2, (k, 1))
    weights = np.full(k, 1.0 / k)
    previous = -np.inf
    for _ in range(iterations):
        log_p = _component_log_density(x, weights, loc, var)  # (N, K)
        total = _logsumexp(log_p)
        resp = np.exp(log_p - total[:, None])
        counts = resp.sum(axis=0) + 1e-10
        weights = counts / n
        loc = resp.T @ x / counts[:, None]
        var = np.maximum(resp.T @ (x * x) / counts[:, None] - loc ** 2, 0) + MIN_SCALE ** 2
        mean_log_likelihood = float(total.mean())
        if mean_log_likelihood - previous < tol * max(1.0, abs(previous)):
            break
        previous = mean_log_likelihood
    return float(_logsumexp(_component_log_density(x, weights, loc, var)).mean()), weights, loc, var


def draw(prior: dict | None, n: int, latent_dim: int, rng: np.random.Generator) -> np.ndarray:
    """z (n, latent_dim) float32: eps ~ N(0, I) from `rng`, then through `sample` when a prior
    is given (None: z = eps, the model's prior). Every sampler in kvae draws this way, so one
    seed gives the same z in kvae.fit's samples.png, kvae.runtime and the benchmarks."""
    eps = rng.standard_normal((n, latent_dim), dtype=np.float32)
    return eps if prior is None else sample(prior, eps, rng)


def sample(prior: dict, eps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """z (n, D) float32 from the mixture: component k with probability weights[k] (drawn with
    `rng`), z = loc[k] + scale[k] * eps."""
    weights = np.asarray(prior["weights"], np.float64)
    which = np.searchsorted(np.cumsum(weights / weights.sum()), rng.random(len(eps)), side="right")
    which = np.minimum(which, len(weights) - 1)
    loc, scale = np.asarray(prior["loc"], np.float32), np.asarray(prior["scale"], np.float32)
    return (loc[which] + scale[which] * eps).astype(np.float32)


def check(prior: dict, latent_dim: int, source) -> dict:
    """`prior` if it is a mixture over `latent_dim` dimensions, else ValueError naming `source`."""
    try:
        weights = np.asarray(prior["weights"], np.float64)
        loc, scale = np.asarray(prior["loc"], np.float64), np.asarray(prior["scale"], np.float64)
        ok = (prior.get("kind") == KIND and weights.ndim == 1 and len(weights) >= 1
              and loc.shape == scale.shape == (len(weights), latent_dim)
              and np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights.sum() > 0
              and np.all(scale > 0)
              and np.all(np.isfinite(loc)) and np.all(np.isfinite(scale)))
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"{source} is not a kvae prior over {latent_dim} latent dimensions "
                         f"(expected {KIND}: weights [K], loc and scale [K][{latent_dim}])")
    return prior


def read(path: str | Path, latent_dim: int) -> dict:
    """The prior in `path` (checked against `latent_dim`)."""
    from kvae.files import read_json_object

    return check(read_json_object(Path(path)), latent_dim, path)


def write(path: str | Path, prior: dict) -> None:
    from kvae.files import atomic_write_json

    atomic_write_json(path, prior, indent=None)


def log_density(prior: dict, z: np.ndarray, rows: int = 4096) -> np.ndarray:
    """log p(z) under the mixture, (n,) float64 (z (n, D)), `rows` z at a time (memory: rows x K)."""
    z = np.asarray(z, np.float64)
    weights, loc = np.asarray(prior["weights"], np.float64), np.asarray(prior["loc"], np.float64)
    var = np.square(np.asarray(prior["scale"], np.float64))
    out = np.empty(len(z))
    for start in range(0, len(z), rows):
        out[start:start + rows] = _logsumexp(_component_log_density(z[start:start + rows], weights, loc, var))
    return out


def _component_log_density(x, weights, loc, var):
    """log weights[k] + log N(x_i; loc[k], diag var[k]) as (N, K)."""
    inv = 1.0 / var
    quad = (x * x) @ inv.T - 2 * x @ (loc * inv).T + np.sum(loc * loc * inv, axis=1)
    log_det = np.sum(np.log(var), axis=1)
    return np.log(np.maximum(weights, 1e-300)) - 0.5 * (quad + log_det + x.shape[1] * np.log(2 * np.pi))


def _logsumexp(a):
    top = a.max(axis=1)
    return top + np.log(np.exp(a - top[:, None]).sum(axis=1))


def _kmeans_plus_plus(x, k, rng):
    centers = [x[rng.integers(len(x))]]
    dist = np.sum((x - centers[0]) ** 2, axis=1)
    for _ in range(1, k):
        total = dist.sum()
        index = rng.choice(len(x), p=dist / total) if total > 0 else rng.integers(len(x))
        centers.append(x[index])
        dist = np.minimum(dist, np.sum((x - x[index]) ** 2, axis=1))
    return np.array(centers)
