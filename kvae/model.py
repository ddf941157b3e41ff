"""Encoder, decoder, the VAE that joins them, and the likelihoods P(X|z).

    encoder      x (B, H, W, C) in [0, 1]  ->  loc, scale (B, latent_dim), scale > 0
    Posterior    (loc, scale)  ->  z ~ Q(z|X), adds beta * KL[Q(z|X) || P(z)]   (kvae.layers)
    decoder_net  z (B, latent_dim)  ->  logits (B, H, W, C)
    decoder      z  ->  x_mean = sigmoid(logits): Bernoulli probabilities or the Gaussian mean

Loss per batch = mean over X of [-log P(X|z) + beta * KL] = the negative ELBO when beta = 1.

Conditional (Doersch, section 4: `num_classes` > 0): the condition y, a one-hot float32
(B, num_classes) class label, is a second input of both halves, Q(z|X, y) and P(X|z, y); it is
concatenated after the encoder's convolutions, and at every decoder layer but the last (with z,
then as constant feature maps: `build_decoder_net`). The prior stays N(0, I) by default, and the Posterior
layer and its KL are unchanged.

Written with `keras.ops`: the same model trains under KERAS_BACKEND=tensorflow or jax.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from kvae.config import CONV_ARCHS, Config
from kvae.layers import Posterior

register = keras.saving.register_keras_serializable(package="kvae")


def reconstruction_nll(x, logits, likelihood: str = "bernoulli", sigma: float = 0.1):
    """-log P(X|z) per example, summed over pixels: shape (B,).

    Bernoulli uses logits (max(l, 0) - l x + log(1 + exp(-|l|))), stable for confident pixels.
    Gaussian is N(x; sigmoid(logits), sigma^2 I) with sigma a fixed hyperparameter (Doersch 2.1).
    """
    logits = ops.cast(logits, "float32")
    x = ops.cast(x, "float32")
    axes = tuple(range(1, len(logits.shape)))
    if likelihood == "bernoulli":  # the stable form of tf.nn.sigmoid_cross_entropy_with_logits
        nll = ops.relu(logits) - logits * x + ops.log1p(ops.exp(-ops.abs(logits)))
    elif likelihood == "gaussian":
        mean = ops.sigmoid(logits)
        nll = 0.5 * ops.square((x - mean) / sigma) + math.log(sigma) + 0.5 * math.log(2 * math.pi)
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}")
    return ops.sum(nll, axis=axes)


def build_encoder(image_shape, latent_dim: int, arch: str = "conv", hidden: int = 256,
                  filters: int = 32, num_classes: int = 0, dropout: float = 0.0,
                  noise: float = 0.0) -> keras.Model:
    """x (B, H, W, C) [, y (B, num_classes)] -> [loc, scale] (B, latent_dim); scale > 0.

    Args:
      dropout: rate of the Dropout after each hidden layer (training only; 0 = none).
      noise: standard deviation of Gaussian noise added to x in training (the denoising form of
        amortized inference regularization, Shu et al. 2018; 0 = none).
    """
    x = keras.Input(image_shape, name="x")
    drop = _dropout(dropout)
    h = keras.layers.GaussianNoise(noise)(x) if noise else x  # seeded by keras.utils.set_random_seed
    if arch in CONV_ARCHS:
        # resnet keeps conv's encoder: residual blocks there gained 0.9 nats for 1.65x the
        # training time per step (docs/benchmarks.md); the decoder's are nearly free
        h = drop(keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(h))
        h = drop(keras.layers.Conv2D(2 * filters, 3, strides=2, padding="same", activation="relu")(h))
        h = keras.layers.Flatten()(h)
    else:
        h = keras.layers.Flatten()(h)
    inputs = [x]
    if num_classes:
        inputs.append(keras.Input((num_classes,), name="y"))
        h = keras.layers.Concatenate()([h, inputs[1]])
    if arch not in CONV_ARCHS:
        h = drop(keras.layers.Dense(2 * hidden, activation="relu")(h))
    h = drop(keras.layers.Dense(hidden, activation="relu")(h))
    loc = keras.layers.Dense(latent_dim, name="loc", dtype="float32")(h)
    scale = keras.layers.Dense(latent_dim, activation="softplus", name="scale", dtype="float32")(h)
    return keras.Model(inputs if num_classes else x, [loc, scale], name="encoder")


def build_decoder_net(image_shape, latent_dim: int, arch: str = "conv", hidden: int = 256,
                      filters: int = 32, num_classes: int = 0, dropout: float = 0.0) -> keras.Model:
    """z (B, latent_dim) [, y (B, num_classes)] -> logits (B, H, W, C).

    A conditional decoder sees y at every layer but the last (with z, then next to each hidden
    layer: as K constant feature maps in the conv stages), so the class shapes every scale of the
    image and z is left the style (y only next to z let z carry the class: samples of other
    classes in a class's row). `dropout`: rate of the Dropout after each hidden layer (training
    only; 0 = none).
    """
    height, width, channels = image_shape
    z = keras.Input((latent_dim,), name="z")
    y = keras.Input((num_classes,), name="y") if num_classes else None
    drop = _dropout(dropout)

    def with_y(h):
        return h if y is None else _concat_condition(h, y)

    h = drop(keras.layers.Dense(hidden, activation="relu")(with_y(z)))
    if arch in CONV_ARCHS:
        h4, w4 = math.ceil(height / 4), math.ceil(width / 4)
        h = drop(keras.layers.Dense(h4 * w4 * 2 * filters, activation="relu")(with_y(h)))
        h = keras.layers.Reshape((h4, w4, 2 * filters))(h)
        if arch == "resnet":  # deeper and narrower at 14 x 14: about conv's cost per image
            h = drop(_residual(h, 2 * filters, with_y))
            h = drop(keras.layers.Conv2DTranspose(filters, 3, strides=2, padding="same",
                                                  activation="relu")(with_y(h)))
            h = drop(_residual(h, filters, with_y))
        else:
            h = drop(keras.layers.Conv2DTranspose(2 * filters, 3, strides=2, padding="same",
                                                  activation="relu")(with_y(h)))
        h = drop(keras.layers.Conv2DTranspose(filters, 3, strides=2, padding="same",
                                              activation="relu")(with_y(h)))
        h = keras.layers.Conv2DTranspose(channels, 3, padding="same", dtype="float32")(h)
        if (4 * h4, 4 * w4) != (height, width):  # sizes not divisible by 4
            h = keras.layers.Cropping2D(((0, 4 * h4 - height), (0, 4 * w4 - width)))(h)
        logits = keras.layers.Identity(name="logits", dtype="float32")(h)
    else:
        h = drop(keras.layers.Dense(2 * hidden, activation="relu")(with_y(h)))
        h = keras.layers.Dense(height * width * channels, dtype="float32")(with_y(h))
        logits = keras.layers.Reshape(image_shape, name="logits", dtype="float32")(h)
    return keras.Model([z, y] if num_classes else z, logits, name="decoder_net")


def _dropout(rate: float):
    """h -> Dropout(rate)(h), or h itself when rate is 0 (the model then has no Dropout layer)."""
    return (lambda h: keras.layers.Dropout(rate)(h)) if rate else (lambda h: h)


def _residual(h, channels: int, before=lambda h: h):
    """relu(h + conv(relu(conv(before(h))))): a residual block of two 3x3 convolutions (He et
    al. 2016) that keeps h's shape; `before` lets a conditional decoder append y to its input."""
    r = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(before(h))
    r = keras.layers.Conv2D(channels, 3, padding="same")(r)
    return keras.layers.Activation("relu")(keras.layers.Add()([h, r]))


def _concat_condition(h, y):
    """h (B, F) or (B, H, W, C) with y (B, K) appended: as K features, or as K constant maps."""
    if len(h.shape) == 2:
        return keras.layers.Concatenate()([h, y])
    rows, cols = int(h.shape[1]), int(h.shape[2])
    maps = keras.layers.UpSampling2D((rows, cols))(keras.layers.Reshape((1, 1, int(y.shape[-1])))(y))
    return keras.layers.Concatenate()([h, maps])


@register
class VAE(keras.Model):
    """Encoder + posterior + decoder, trained on the negative ELBO.

    Args:
      encoder: x -> [loc, scale] (conditional: [x, y] -> [loc, scale]).
      decoder_net: z -> logits (conditional: [z, y] -> logits).
      likelihood: `bernoulli` or `gaussian`.
      sigma: the Gaussian likelihood's standard deviation.
      beta: KL weight (the posterior layer's initial `beta`).
      seed: seeds the posterior's eps.
      free_bits: nats per latent dimension the KL term does not penalize (the posterior's).
      prior_mixture: K > 0 learns P(z) as a mixture of K diagonal Gaussians (the posterior's
        `components`); 0 = N(0, I).
    """

    def __init__(self, encoder, decoder_net, likelihood: str = "bernoulli", sigma: float = 0.1,
                 beta: float = 1.0, seed: int | None = None, free_bits: float = 0.0,
                 prior_mixture: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder_net = decoder_net
        self.likelihood = likelihood
        self.sigma = float(sigma)
        self.beta = float(beta)
        self.seed = seed
        self.free_bits = float(free_bits)
        self.prior_mixture = int(prior_mixture)
        self.posterior = Posterior(beta=beta, seed=seed, free_bits=free_bits, components=prior_mixture,
                                   name="posterior")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_tracker = keras.metrics.Mean(name="kl_loss")  # unweighted D[Q(z|X) || P(z)]

    @property
    def latent_dim(self) -> int:
        return int(self.encoder.outputs[0].shape[-1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.encoder.inputs[0].shape[1:])

    @property
    def num_classes(self) -> int:
        """Size of the condition y (0: an unconditional model)."""
        return int(self.encoder.inputs[1].shape[-1]) if len(self.encoder.inputs) > 1 else 0

    def call(self, inputs, training=None):
        """x, or (x, y) for a conditional model -> logits (B, H, W, C) of P(X|z[, y])."""
        if self.num_classes:
            x, y = inputs
            loc, scale = self.encoder([x, y], training=training)
        else:
            loc, scale = self.encoder(inputs, training=training)
        z = self.posterior([loc, scale], training=training)
        return self.decoder_net([z, y] if self.num_classes else z, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self.num_classes and y is None:  # x = (images, condition): the images are the target
            x = x[0]
        target = x if y is None else y
        rec = ops.mean(reconstruction_nll(target, y_pred, self.likelihood, self.sigma))
        self.reconstruction_tracker.update_state(rec)
        self.kl_tracker.update_state(self.posterior.kl)  # this batch's, set by posterior.call
        loss = rec + sum(ops.cast(loss, "float32") for loss in self.losses)
        # Under tf.distribute each replica sees part of the global batch; gradients are summed.
        return loss / _replicas()

    def train_step(self, *args):  # (data) under TensorFlow, (state, data) under JAX
        return _with_batch_axis(super().train_step(*args))

    def test_step(self, *args):
        return _with_batch_axis(super().test_step(*args))

    def model_prior(self) -> dict | None:
        """The learned prior P(z) as a kvae.prior mixture (numpy), or None for N(0, I)."""
        return self.posterior.mixture_prior()

    def encode(self, x, y=None):
        """x (B, H, W, C) in [0, 1] [, y (B, num_classes)] -> (loc, scale) of Q(z|X[, y])."""
        return self.encoder(self._with(x, y))

    def decode(self, z, y=None):
        """z (B, latent_dim) [, y (B, num_classes)] -> x_mean (B, H, W, C): P(X|z[, y])'s mean."""
        return ops.sigmoid(ops.cast(self.decoder_net(self._with(z, y)), "float32"))

    def _with(self, tensor, y):
        """The input of a half: `tensor`, or [tensor, y] for a conditional model."""
        if bool(self.num_classes) != (y is not None):
            raise ValueError("a conditional model needs y (one-hot labels), an unconditional one "
                             f"takes none (num_classes={self.num_classes})")
        # as tensors both: Keras refuses a list that mixes tensors and numpy arrays
        return [ops.convert_to_tensor(tensor), ops.convert_to_tensor(y)] if self.num_classes else tensor

    def decoder(self) -> keras.Model:
        """A standalone z [, y] -> x_mean model sharing this VAE's weights (for saving and export)."""
        z = keras.Input((self.latent_dim,), name="z")
        inputs = [z, keras.Input((self.num_classes,), name="y")] if self.num_classes else z
        x_mean = keras.layers.Activation("sigmoid", name="x_mean", dtype="float32")(self.decoder_net(inputs))
        return keras.Model(inputs, x_mean, name="decoder")

    def get_config(self):
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "decoder_net": keras.saving.serialize_keras_object(self.decoder_net),
            "likelihood": self.likelihood,
            "sigma": self.sigma,
            "beta": self.beta,
            "seed": self.seed,
            "free_bits": self.free_bits,
            "prior_mixture": self.prior_mixture,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("encoder", "decoder_net"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def _strategy():
    """The tf.distribute strategy in scope (None under other backends)."""
    return _tf().distribute.get_strategy() if keras.backend.backend() == "tensorflow" else None


def _tf():
    import tensorflow as tf

    return tf


def _replicas() -> int:
    strategy = _strategy()
    return strategy.num_replicas_in_sync if strategy is not None else 1


def _with_batch_axis(logs):
    """Keras 3 reduces multi-worker step outputs with reduce(MEAN, axis=0), which fails on
    scalars (tensorflow/tensorflow#72388); give them an axis there, nowhere else."""
    strategy = _strategy()
    if strategy is not None and isinstance(strategy, _tf().distribute.MultiWorkerMirroredStrategy):
        return {name: ops.reshape(value, [1]) for name, value in logs.items()}
    return logs


def build_vae(config: Config, image_shape, num_classes: int = 0) -> VAE:
    """Builds (and calls once, so every weight exists) the VAE that `config` describes.

    Args:
      num_classes: the condition's size for a conditional model (`config.conditional`): the
        dataset's class count; 0 for an unconditional one.
    """
    if config.conditional and num_classes < 1:
        raise ValueError("a conditional VAE needs num_classes >= 1")
    num_classes = num_classes if config.conditional else 0
    encoder = build_encoder(image_shape, config.latent_dim, config.resolved_arch, config.hidden,
                            config.filters, num_classes, dropout=config.dropout,
                            noise=config.encoder_noise)
    decoder_net = build_decoder_net(image_shape, config.latent_dim, config.resolved_arch, config.hidden,
                                    config.filters, num_classes, dropout=config.dropout)
    vae = VAE(encoder, decoder_net, config.likelihood, config.sigma, config.resolved_beta, config.seed,
              free_bits=config.free_bits, prior_mixture=config.resolved_prior_mixture, name="vae")
    x = ops.zeros((1, *image_shape))
    vae((x, ops.zeros((1, num_classes))) if num_classes else x)
    return vae


def load_vae(path) -> VAE:
    """Loads a `.keras` VAE with safe_mode=True (no arbitrary code)."""
    return keras.saving.load_model(path, safe_mode=True, compile=False)
