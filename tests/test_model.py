"""The model: shapes, the KL that add_loss contributes, the loss, gradients, save/load."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from kvae.config import Config
from kvae.model import build_vae, load_vae, reconstruction_nll

tfd = tfp.distributions


def small_vae(arch="conv", likelihood="bernoulli", shape=(28, 28, 1), **kw):
    """A small VAE, with P(z) = N(0, I) unless `prior_mixture` is given (the closed-form KL)."""
    kw.setdefault("prior_mixture", 0)
    return build_vae(Config(arch=arch, likelihood=likelihood, latent_dim=5, hidden=16, **kw), shape)


@pytest.mark.parametrize("arch", ["conv", "mlp"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("shape", [(28, 28, 1), (30, 26, 3), (8, 8, 1)])
def test_shapes(arch, likelihood, shape):
    vae = small_vae(arch, likelihood, shape)
    x = tf.random.uniform((3, *shape))
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (3, 5)
    assert np.all(scale.numpy() > 0)
    x_mean = vae.decode(loc)
    assert x_mean.shape == (3, *shape)
    assert np.all((x_mean.numpy() >= 0) & (x_mean.numpy() <= 1))
    assert vae(x).shape == (3, *shape)
    assert vae.decoder()(loc).shape == (3, *shape)


def test_add_loss_kl_equals_closed_form():
    vae = small_vae(beta=1.0)
    x = tf.random.uniform((6, 28, 28, 1))
    vae(x)
    loc, scale = [t.numpy().astype(np.float64) for t in vae.encode(x)]
    by_hand = 0.5 * np.sum(loc**2 + scale**2 - 1 - 2 * np.log(scale), axis=1).mean()
    assert len(vae.losses) == 1
    np.testing.assert_allclose(float(vae.losses[0]), by_hand, rtol=1e-5)


def test_beta_scales_the_kl():
    vae = small_vae(beta=0.25)
    x = tf.random.uniform((4, 28, 28, 1))
    vae(x)
    loc, scale = [t.numpy().astype(np.float64) for t in vae.encode(x)]
    by_hand = 0.5 * np.sum(loc**2 + scale**2 - 1 - 2 * np.log(scale), axis=1).mean()
    np.testing.assert_allclose(float(vae.losses[0]), 0.25 * by_hand, rtol=1e-5)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_reconstruction_nll_matches_tfp(likelihood):
    x = tf.cast(tf.random.uniform((4, 6, 5, 2)) > 0.5, tf.float32)
    logits = tf.random.normal((4, 6, 5, 2)) * 3
    ours = reconstruction_nll(x, logits, likelihood, sigma=0.3)
    if likelihood == "bernoulli":
        ref = -tfd.Independent(tfd.Bernoulli(logits=logits), 3).log_prob(x)
    else:
        ref = -tfd.Independent(tfd.Normal(tf.sigmoid(logits), 0.3), 3).log_prob(x)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-5)


def test_loss_is_reconstruction_plus_kl_and_every_variable_gets_a_gradient():
    vae = small_vae()
    x = tf.cast(tf.random.uniform((8, 28, 28, 1)) > 0.5, tf.float32)
    with tf.GradientTape() as tape:
        logits = vae(x, training=True)
        loss = vae.compute_loss(x=x, y_pred=logits)
    rec = tf.reduce_mean(reconstruction_nll(x, logits))
    np.testing.assert_allclose(float(loss), float(rec + vae.losses[0]), rtol=1e-6)
    grads = tape.gradient(loss, vae.trainable_variables)
    assert len(grads) == len(vae.trainable_variables) > 0
    for var, grad in zip(vae.trainable_variables, grads):
        assert grad is not None, var.path
        assert float(tf.reduce_max(tf.abs(grad))) > 0, var.path  # reparameterization reaches the encoder


def test_named_metrics_after_a_train_step():
    import keras

    vae = small_vae()
    vae.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = np.random.default_rng(0).random((16, 28, 28, 1)).round().astype("float32")
    logs = vae.train_on_batch(x, return_dict=True)
    assert set(logs) == {"loss", "reconstruction_loss", "kl_loss"}
    assert logs["loss"] == pytest.approx(logs["reconstruction_loss"] + logs["kl_loss"], rel=1e-5)


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_keras_save_load_round_trip_safe_mode(tmp_path, arch):
    import keras

    vae = small_vae(arch, "gaussian", (12, 10, 3))
    vae.save(tmp_path / "vae.keras")
    keras.saving.save_model(vae.decoder(), tmp_path / "decoder.keras")
    keras.saving.save_model(vae.encoder, tmp_path / "encoder.keras")
    loaded = load_vae(tmp_path / "vae.keras")
    assert (loaded.likelihood, loaded.sigma, loaded.latent_dim) == ("gaussian", 0.1, 5)
    x = np.random.default_rng(1).random((4, 12, 10, 3)).astype("float32")
    z = np.random.default_rng(2).standard_normal((4, 5)).astype("float32")
    for a, b in zip(vae.encode(x), loaded.encode(x)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(vae.decode(z), loaded.decode(z), atol=1e-6)
    decoder = keras.saving.load_model(tmp_path / "decoder.keras", safe_mode=True)
    np.testing.assert_allclose(vae.decode(z), decoder(z), atol=1e-6)
    encoder = keras.saving.load_model(tmp_path / "encoder.keras", safe_mode=True)
    np.testing.assert_allclose(vae.encode(x)[1], encoder(x)[1], atol=1e-6)
