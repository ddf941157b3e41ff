"""The posterior layer: Q(z|X) as a TFP distribution, a reparameterized sample, and the KL term.

Doersch, "Tutorial on Variational Autoencoders" (2016), section 2.2: Q(z|X) = N(mu(X), Sigma(X))
with diagonal Sigma, z = mu + Sigma^(1/2) * eps with eps ~ N(0, I) (the reparameterization trick),
and the analytic D[Q(z|X) || P(z)] against the prior P(z) = N(0, I).

Backend-portable: under `KERAS_BACKEND=jax` the distributions come from
`tensorflow_probability.substrates.jax` (no TensorFlow needed), under TensorFlow from
`tensorflow_probability`; the layer, its weights and its `.keras` file are the same.
"""

from __future__ import annotations

import keras
from keras import ops

REPLICA_STRIDE = 1_000_003  # seed offset between tf.distribute replicas


def distributions():
    """`tfp.distributions` for the running Keras backend (JAX substrate under jax)."""
    if keras.backend.backend() == "jax":
        from tensorflow_probability.substrates import jax as tfp
    else:
        import tensorflow_probability as tfp
    return tfp.distributions


def prior(latent_dim: int):
    """P(z) = N(0, I)."""
    return distributions().MultivariateNormalDiag(loc=ops.zeros([latent_dim], "float32"),
                                                  scale_diag=ops.ones([latent_dim], "float32"))


@keras.saving.register_keras_serializable(package="kvae")
class Posterior(keras.layers.Layer):
    """Takes the encoder's (loc, scale), returns z ~ Q(z|X) and adds beta * KL with `add_loss`.

    The KL is the analytic `tfd.kl_divergence(Q(z|X), P(z))`, averaged over the batch, so the
    model's total loss is the negative ELBO when beta = 1. `beta` is a non-trainable variable so
    a warm-up callback can change it between epochs without retracing.

    Args:
      beta: weight of the KL term.
      seed: seeds eps. Each call draws eps from the stateless seed (seed, calls so far); the call
        counter is a weight saved with the model, so a resumed run continues the same eps stream.
      free_bits: free bits (Kingma et al. 2016, "Improved Variational Inference with Inverse
        Autoregressive Flow", eq. 15): the loss takes max(free_bits, KL_j) for each latent
        dimension j, KL_j averaged over the batch, so a dimension's first `free_bits` nats cost
        nothing and the encoder is not pushed to switch dimensions off early. 0 = the plain KL.
        The `kl` metric is always the true D[Q(z|X) || P(z)].
    """

    def __init__(self, beta: float = 1.0, seed: int | None = None, free_bits: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.beta_value = float(beta)  # the configured weight (kept for get_config)
        self.seed = seed
        self.free_bits = float(free_bits)
        self.calls = self.add_weight(name="calls", shape=(), dtype="int32", trainable=False,
                                     initializer="zeros", aggregation="only_first_replica")
        self.beta = self.add_weight(name="beta", shape=(), trainable=False,
                                    initializer=keras.initializers.Constant(beta))
        self.kl = None  # the last batch's unweighted D[Q(z|X) || P(z)] (see `call`)

    def call(self, inputs, training=None):
        tfd = distributions()
        loc, scale = inputs  # (B, latent_dim) each, scale > 0
        loc = ops.cast(loc, "float32")  # the posterior and KL stay float32 under mixed precision
        scale = ops.cast(scale, "float32")
        q = tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)
        kl = ops.mean(tfd.kl_divergence(q, prior(loc.shape[-1])))  # mean over the batch
        penalized = kl
        if self.free_bits:  # per dimension: Q's marginals against N(0, 1), batch-averaged
            kl_dims = ops.mean(tfd.kl_divergence(tfd.Normal(loc, scale), tfd.Normal(0.0, 1.0)), axis=0)
            penalized = ops.sum(ops.maximum(kl_dims, self.free_bits))
        self.add_loss(ops.cast(self.beta, "float32") * penalized)
        # For the model's kl_loss metric: metrics update in compute_loss, the one place where
        # every backend (JAX's stateless training step included) lets them change.
        self.kl = kl
        # Reparameterized: z = loc + scale * eps, so gradients flow into loc and scale.
        # Each tf.distribute replica draws its own eps; one device draws what replica 0 would.
        seed = ops.stack([(self.seed or 0) + REPLICA_STRIDE * _replica_id(), self.calls.value])
        self.calls.assign_add(1)
        if keras.backend.backend() == "jax":
            seed = ops.cast(seed, "uint32")  # a raw JAX PRNG key
        return q.sample(seed=seed)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "beta": self.beta_value, "seed": self.seed,
                "free_bits": self.free_bits}


def _replica_id():
    """This tf.distribute replica's index (0 outside tf.distribute and on other backends)."""
    if keras.backend.backend() != "tensorflow":
        return 0
    import tensorflow as tf

    replica = tf.distribute.get_replica_context()
    return ops.cast(replica.replica_id_in_sync_group, "int32") if replica is not None else 0
