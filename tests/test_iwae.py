"""kvae.iwae, the one numpy IWAE estimator (export's nll_delta, the runtime's log_likelihood,
kvae.evaluate's log-sum-exp): closed forms written out here, and its clip rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvae import iwae


def test_log_px_closed_forms():
    """The per-pixel log-likelihoods against their densities written out (no shared code)."""
    rng = np.random.default_rng(0)
    x, mean, sigma = rng.random((1, 3, 20)), rng.random((4, 3, 20)), 0.3
    density = np.exp(-0.5 * ((x - mean) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    np.testing.assert_allclose(iwae.log_px(x, mean, "gaussian", sigma), np.log(density).sum(-1), rtol=1e-12)
    binary = (x > 0.5).astype(np.float64)
    mass = np.where(binary == 1, mean, 1 - mean)
    np.testing.assert_allclose(iwae.log_px(binary, mean, "bernoulli"), np.log(mass).sum(-1), rtol=1e-12)


@pytest.mark.parametrize("precision, quantization, lo", [
    ("fp32", None, 2.0 ** -149), ("fp16", None, 2.0 ** -149), ("int8", "dynamic", 2.0 ** -149),
    ("int8", "static", 2.0 ** -9), ("int8", None, 2.0 ** -149)])
def test_the_clip_rule_is_the_file_resolution(precision, quantization, lo):
    low, high = iwae.p_range(precision, quantization)
    assert low == lo and high == (1 - 2.0 ** -25 if lo < 1e-40 else 1 - 2.0 ** -9)
    # p = 0 for a pixel that is on costs log(lo), and p = 1 for a pixel that is off log(1 - high)
    assert iwae.log_px(np.array([1.0, 0.0]), np.array([0.0, 1.0]), "bernoulli", p_range=(low, high)) == \
        pytest.approx(math.log(low) + math.log(1 - high))
    # inside the range nothing is clipped: the clip is only in the term that needs it
    assert iwae.log_px(np.array([1.0, 0.0]), np.array([0.3, 0.3]), "bernoulli", p_range=(low, high)) == \
        pytest.approx(math.log(0.3) + math.log(0.7))


def test_logsumexp_is_stable_and_minus_infinity_safe():
    a = np.array([[1000.0, -np.inf], [1000.0, -np.inf]])
    np.testing.assert_allclose(iwae.logsumexp(a), [1000 + math.log(2), -np.inf])
    assert not np.any(np.isnan(iwae.logsumexp(a)))


def test_log_prior_over_q_written_out():
    rng = np.random.default_rng(2)
    loc, scale, eps = rng.normal(size=(3, 2)), rng.uniform(0.2, 2, (3, 2)), rng.normal(size=(4, 3, 2))
    z, ratio = iwae.log_prior_over_q(loc, scale, eps)
    np.testing.assert_allclose(z, loc + scale * eps)
    normal = lambda v, m, s: np.exp(-0.5 * ((v - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))  # noqa: E731
    expected = np.log(normal(z, 0, 1).prod(-1)) - np.log(normal(z, loc, scale).prod(-1))
    np.testing.assert_allclose(ratio, expected, rtol=1e-10)


def test_nll_with_the_prior_as_proposal_and_a_constant_decoder():
    """A decoder that always says 0.5 and a posterior equal to the prior: NLL = P log 2 exactly."""
    rng = np.random.default_rng(0)
    x = (rng.random((5, 4, 4, 1)) < 0.5).astype(np.float32)
    loc, scale = np.zeros((5, 3), np.float32), np.ones((5, 3), np.float32)
    eps = rng.standard_normal((7, 5, 3)).astype(np.float32)
    nll = iwae.nll(x, loc, scale, eps, lambda z: np.full((len(z), 4, 4, 1), 0.5, np.float32), chunk=4)
    np.testing.assert_allclose(nll, 16 * math.log(2), rtol=1e-6)


def test_no_second_copy_in_the_modules_that_use_it():
    import kvae.evaluate
    import kvae.export
    import kvae.export_checks
    import kvae.runtime

    for module in (kvae.export, kvae.export_checks, kvae.runtime, kvae.evaluate):
        copies = {"LOG_2PI", "logsumexp", "_log_px", "P_MIN", "P_MAX"} & set(vars(module))
        assert not copies, (module.__name__, copies)
    assert not hasattr(kvae.export, "iwae_nll")  # kvae.evaluate.iwae_nll is the Keras model's own


def test_log_prior_over_q_with_a_learned_mixture():
    """prior= a kvae.prior mixture: log P(z) is its density (scipy here); one standard component is N(0, I)."""
    from scipy.stats import norm

    from reference import mixture_log_density

    rng = np.random.default_rng(5)
    loc, scale, eps = rng.normal(size=(3, 2)), rng.uniform(0.2, 2, (3, 2)), rng.normal(size=(4, 3, 2))
    prior = {"weights": [0.2, 0.5, 0.3], "loc": rng.normal(size=(3, 2)), "scale": rng.uniform(0.3, 2, (3, 2))}
    z, ratio = iwae.log_prior_over_q(loc, scale, eps, prior)
    log_p = mixture_log_density(prior, z)
    np.testing.assert_allclose(ratio, log_p - norm.logpdf(z, loc, scale).sum(-1), rtol=1e-10)
    standard = {"weights": [1.0], "loc": [[0.0, 0.0]], "scale": [[1.0, 1.0]]}
    np.testing.assert_allclose(iwae.log_prior_over_q(loc, scale, eps, standard)[1],
                               iwae.log_prior_over_q(loc, scale, eps)[1], rtol=1e-12)
