"""The importance-weighted log-likelihood: against a closed form, against the ELBO, and its CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from kvae.evaluate import iwae_nll, summarize

SIGMA = 0.1


class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, sigma^2 I): log p(x) = log N(x; b, WW^T + sigma^2 I).

    W has orthogonal columns, so the true posterior is diagonal; `inflate` widens Q on purpose
    so that the importance weights are not all equal.
    """

    likelihood, sigma = "gaussian", SIGMA

    def model_prior(self):  # P(z) = N(0, I), as kvae.model.VAE.model_prior says
        return None

    def __init__(self, inflate=1.3):
        self.W = np.array([[0.04, 0.0], [0.0, 0.03], [0.0, 0.0]], np.float64)  # (pixels=3, D=2)
        self.b = np.array([0.5, 0.5, 0.6])
        precision = np.eye(2) + self.W.T @ self.W / SIGMA**2
        self.post_cov = np.linalg.inv(precision)
        self.inflate = inflate

    def encoder(self, x):
        x = np.asarray(x, np.float64).reshape(len(x), 3)
        loc = (x - self.b) @ self.W @ self.post_cov.T / SIGMA**2
        scale = np.sqrt(np.diag(self.post_cov)) * self.inflate * np.ones_like(loc)
        return tf.constant(loc, tf.float32), tf.constant(scale, tf.float32)

    def decoder_net(self, z):
        mean = tf.matmul(tf.cast(z, tf.float64), self.W.T) + self.b  # in (0, 1) for |z| < 10
        logits = tf.math.log(mean) - tf.math.log1p(-mean)  # sigmoid(logits) == mean
        return tf.reshape(tf.cast(logits, tf.float32), (-1, 1, 3, 1))

    def log_px(self, x):
        x = x.reshape(len(x), 3)
        cov = self.W @ self.W.T + SIGMA**2 * np.eye(3)
        d = x - self.b
        _, logdet = np.linalg.slogdet(cov)
        return -0.5 * (np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) + logdet + 3 * np.log(2 * np.pi))


def test_iwae_matches_the_closed_form_log_likelihood():
    model = LinearGaussian()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((200, 2))
    x = (z @ model.W.T + model.b + SIGMA * rng.standard_normal((200, 3))).reshape(200, 1, 3, 1)
    nll = iwae_nll(model, x.astype(np.float32), k=2000, seed=1)["nll"]
    exact = -model.log_px(x)
    assert abs(nll.mean() - exact.mean()) < 0.05
    assert np.abs(nll - exact).max() < 0.05


def test_iwae_k1_is_the_elbo_in_expectation_and_tightens_with_k():
    model = LinearGaussian(inflate=2.0)  # a poor Q: a large gap between ELBO and log p(x)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((400, 2)) @ model.W.T + model.b).reshape(400, 1, 3, 1).astype(np.float32)
    results = {k: summarize(iwae_nll(model, x, k=k, seed=2)) for k in (1, 10, 100)}
    one = iwae_nll(model, x, k=1, seed=3)
    diff = one["nll"] - (one["reconstruction"] + one["kl"])  # single-sample minus analytic-KL ELBO
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(len(diff))
    for small, big in ((1, 10), (10, 100)):
        se = results[small]["nll_se"] + results[big]["nll_se"]
        assert results[big]["nll"] <= results[small]["nll"] + 0.1 * se
    assert results[100]["nll"] < results[1]["nll"] - 0.3  # the bound really tightens
    exact = -model.log_px(x).mean()
    assert results[100]["nll"] >= exact - 0.05  # and never passes log p(x)


def test_chunking_does_not_change_the_estimate():
    model = LinearGaussian()
    x = np.random.default_rng(4).random((30, 1, 3, 1)).astype(np.float32) * 0.2 + 0.4
    a = iwae_nll(model, x, k=64, seed=5, batch_size=7, budget=7 * 3 * 64)
    b = iwae_nll(model, x, k=64, seed=5, batch_size=7, budget=7 * 3 * 5)  # 13 chunks of 5
    assert np.isfinite(a["nll"]).all()
    np.testing.assert_allclose(a["nll"].mean(), b["nll"].mean(), atol=0.05)


def test_evaluate_cli_stores_metrics_and_figures(trained_run):
    from PIL import Image

    run = trained_run("conv")
    result = subprocess.run([sys.executable, "-m", "kvae.evaluate", str(run), "--k", "50", "--n", "100"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "-log P(X) (IWAE)" in result.stdout and "negative ELBO" in result.stdout
    ev = json.loads((run / "metrics.json").read_text())["eval"]
    assert (ev["k"], ev["n"], ev["dataset"], ev["split"], ev["binarize_seed"]) == (50, 100, "mnist-5k", "val", 2015)
    assert ev["nll"] <= ev["neg_elbo"]
    assert 50 < ev["nll"] < 400
    for name in ("latent.png", "traversals.png", "training_curves.png", "samples.png"):
        with Image.open(run / name) as im:
            im.verify()


def test_manifold_for_a_2d_latent(trained_run):
    from PIL import Image

    run = trained_run("mlp", latent_dim=2, epochs=1)
    with Image.open(run / "manifold.png") as im:
        assert im.size[0] > 20 * 28
    assert (run / "latent.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "--k must be a positive integer"),
    (["--n", "-1"], "--n must be a positive integer"),
])
def test_evaluate_bad_flags(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "kvae.evaluate", str(tmp_path), *args],
                            capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_on_a_folder_that_is_not_a_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kvae.evaluate", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "is not a run folder" in result.stderr
