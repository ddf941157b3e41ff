"""The model levers of issue 16 (kvae.config): dropout, encoder noise and free bits act in
training only and are no-ops when off; --arch resnet is a conv model with residual blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

from kvae import data as kdata  # noqa: E402
from kvae.config import Config  # noqa: E402
from kvae.layers import Posterior  # noqa: E402
from kvae.model import build_vae  # noqa: E402

LEVERS = {"dropout": 0.3, "encoder_noise": 0.5}


def small(arch="conv", num_classes=0, shape=(28, 28, 1), **kw):
    kw.setdefault("prior_mixture", 0 if kw.get("free_bits") else None)  # free bits: P(z) = N(0, I)
    config = Config(arch=arch, latent_dim=5, hidden=16, filters=8, conditional=bool(num_classes), **kw)
    return build_vae(config, shape, num_classes)


def layer_types(model):
    return {type(layer).__name__ for layer in model.layers}


@pytest.mark.parametrize("arch", ["conv", "resnet", "mlp"])
def test_training_only_levers_change_no_weight_and_no_inference(arch):
    """With the levers on the halves hold the same weights, and with the same weights they
    compute exactly what the lever-free halves compute outside training: what is exported."""
    off, on = small(arch), small(arch, **LEVERS)
    assert not layer_types(off.encoder) & {"Dropout", "GaussianNoise"}
    assert not layer_types(off.decoder_net) & {"Dropout", "GaussianNoise"}
    assert {"Dropout", "GaussianNoise"} <= layer_types(on.encoder) and "Dropout" in layer_types(on.decoder_net)
    assert [w.shape for w in on.weights] == [w.shape for w in off.weights]
    off.set_weights(on.get_weights())
    rng = np.random.default_rng(0)
    x = rng.random((4, 28, 28, 1)).astype(np.float32)
    z = rng.standard_normal((4, 5)).astype(np.float32)
    for a, b in zip(on.encode(x), off.encode(x)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(on.decode(z)), np.asarray(off.decode(z)))
    # in training they act: noise on the encoder's input, dropout in both halves
    trained = np.asarray(on.encoder(x, training=True)[0])
    assert np.abs(trained - np.asarray(off.encoder(x, training=False)[0])).max() > 1e-4
    logits_on = np.asarray(on.decoder_net(z, training=True))
    assert np.abs(logits_on - np.asarray(off.decoder_net(z, training=True))).max() > 1e-4


def test_free_bits_penalize_max_of_floor_and_each_dimensions_kl():
    rng = np.random.default_rng(0)
    loc = rng.normal(0, [0.05, 0.05, 1.0, 2.0], (64, 4)).astype(np.float32)  # two idle dimensions
    scale = rng.uniform([0.95, 0.9, 0.3, 0.2], [1.0, 1.0, 0.5, 0.4], (64, 4)).astype(np.float32)
    kl_bd = 0.5 * (loc.astype(np.float64) ** 2 + scale ** 2.0 - 1 - 2 * np.log(scale))  # (B, D)
    for free_bits in (0.0, 0.2):
        layer = Posterior(free_bits=free_bits, seed=1)
        layer([tf.constant(loc), tf.constant(scale)])
        per_dim = kl_bd.mean(0)
        want = per_dim.sum() if not free_bits else np.maximum(per_dim, free_bits).sum()
        np.testing.assert_allclose(float(layer.losses[0]), want, rtol=1e-5)
        np.testing.assert_allclose(float(layer.kl), per_dim.sum(), rtol=1e-5)  # the true KL
    assert per_dim[:2].max() < 0.2 < per_dim[2:].min()  # so the floor made a difference


def test_free_bits_round_trip_through_keras_files(tmp_path):
    from kvae.model import load_vae

    vae = small(free_bits=0.25)
    vae.save(tmp_path / "vae.keras")
    loaded = load_vae(tmp_path / "vae.keras")
    assert loaded.free_bits == loaded.posterior.free_bits == 0.25


@pytest.mark.parametrize("shape", [(28, 28, 1), (30, 26, 3), (8, 8, 1)])
def test_resnet_shapes_and_blocks(shape):
    vae = small("resnet", shape=shape)
    adds = [layer for part in (vae.encoder, vae.decoder_net) for layer in part.layers
            if type(layer).__name__ == "Add"]
    assert len(adds) == 2  # the decoder's residual blocks, at 1/4 and 1/2 of the image's size
    assert not [layer for layer in vae.encoder.layers if type(layer).__name__ == "Add"]
    x = tf.random.uniform((3, *shape))
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (3, 5) and np.all(scale.numpy() > 0)
    assert vae.decode(loc).shape == (3, *shape)


def test_resnet_decoder_takes_the_label():
    """(Its gradients, y's included, are test_conditional's train-step test, parametrized over resnet.)"""
    vae = small("resnet", num_classes=3)
    y = kdata.one_hot(np.arange(8) % 3, 3)
    z = np.random.default_rng(2).standard_normal((8, 5)).astype(np.float32)
    other = kdata.one_hot((np.arange(8) + 1) % 3, 3)
    assert np.abs(np.asarray(vae.decode(z, y)) - np.asarray(vae.decode(z, other))).max() > 1e-3


def test_kl_divergence_of_the_posterior_is_tfp():
    """The Posterior keeps TFP's analytic KL as its core with free bits on (per dimension: TFP's
    Normal KL, summing to the MultivariateNormalDiag one)."""
    tfd = tfp.distributions
    rng = np.random.default_rng(3)
    loc = rng.standard_normal((5, 3)).astype(np.float32)
    scale = rng.uniform(0.2, 1.5, (5, 3)).astype(np.float32)
    q = tfd.MultivariateNormalDiag(loc, scale)
    p = tfd.MultivariateNormalDiag(tf.zeros(3), tf.ones(3))
    layer = Posterior(free_bits=1e-9)
    layer([tf.constant(loc), tf.constant(scale)])
    np.testing.assert_allclose(float(layer.losses[0]), float(tf.reduce_mean(tfd.kl_divergence(q, p))), rtol=1e-5)


def test_resume_with_dropout_and_noise_equals_an_uninterrupted_run(tmp_path):
    """Dropout's and GaussianNoise's seed states are not in the weights: the checkpoint record
    keeps them (kvae.callbacks.seed_states), so a resumed run draws the same masks and noise."""
    from kvae.fit import fit
    from kvae.model import load_vae

    base = dict(arch="conv", epochs=2, latent_dim=4, hidden=16, filters=4, eval_k=0, batch_size=256,
                prior_components=0, kl_warmup=0, lr_schedule="constant", **LEVERS)  # a schedule spans --epochs
    fit(Config(**base, out=str(tmp_path / "whole")))
    fit(Config(**{**base, "epochs": 1}, out=str(tmp_path / "split")))
    record = (tmp_path / "split" / "state" / "progress.json").read_text()
    assert len(json.loads(record)["seed_states"]) == 8  # GaussianNoise and 7 Dropouts
    fit(Config(**base, out=str(tmp_path / "split")), resume=True)
    whole, split = (load_vae(tmp_path / name / "vae.keras") for name in ("whole", "split"))
    for a, b in zip(whole.weights, split.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


def test_learned_prior_kl_is_log_q_minus_log_p_at_the_sample():
    """--prior-mixture K: add_loss is beta * mean(log Q(z|X) - log P(z)) at the z the layer
    returns, P(z) the layer's mixture (scored here by scipy); with N(0, I) the same estimate
    averages to the analytic KL."""
    from scipy.stats import norm

    from reference import mixture_log_density

    rng = np.random.default_rng(4)
    loc = rng.standard_normal((6, 3)).astype(np.float32)
    scale = rng.uniform(0.3, 1.2, (6, 3)).astype(np.float32)
    layer = Posterior(beta=0.5, seed=2, components=4)
    z = np.float64(layer([tf.constant(loc), tf.constant(scale)]))
    prior = layer.mixture_prior()
    assert prior["loc"].shape == prior["scale"].shape == (4, 3) and np.allclose(prior["weights"], 0.25)
    assert np.allclose(prior["scale"], 1.0) and np.std(prior["loc"]) > 0.3  # the start: N(0, 1) means
    log_p = mixture_log_density(prior, z)
    log_q = norm.logpdf(z, loc, scale).sum(-1)
    np.testing.assert_allclose(float(layer.losses[0]), 0.5 * np.mean(log_q - log_p), rtol=1e-5)
    np.testing.assert_allclose(float(layer.kl), np.mean(log_q - log_p), rtol=1e-5)
    with pytest.raises(ValueError, match="not with a learned mixture prior"):
        Posterior(components=2, free_bits=0.1)


def test_learned_prior_trains_and_round_trips_through_keras_files(tmp_path):
    from kvae.model import load_vae

    vae = small(prior_mixture=3)
    x = tf.cast(tf.random.uniform((8, 28, 28, 1)) > 0.5, tf.float32)
    with tf.GradientTape() as tape:
        loss = vae.compute_loss(x=x, y_pred=vae(x, training=True))
    names = ("prior_logits", "prior_loc", "prior_scale_raw")
    prior_vars = [v for v in vae.trainable_variables if v.name in names]
    assert len(prior_vars) == 3
    for var, grad in zip(prior_vars, tape.gradient(loss, prior_vars)):
        assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0, var.name
    vae.posterior.prior_loc.assign(vae.posterior.prior_loc + 1.0)
    vae.save(tmp_path / "vae.keras")
    loaded = load_vae(tmp_path / "vae.keras")
    assert loaded.prior_mixture == loaded.posterior.components == 3
    for key, value in vae.model_prior().items():
        np.testing.assert_array_equal(loaded.model_prior()[key], value)
    assert small().model_prior() is not None and small(prior_mixture=0).model_prior() is None

