"""The posterior layer: Q(z|X) as a TFP distribution, a reparameterized sample, and the KL term.

Doersch, "Tutorial on Variational Autoencoders" (2016), section 2.2: Q(z|X) = N(mu(X), Sigma(X))
with diagonal Sigma, z = mu + Sigma^(1/2) * eps with eps ~ N(0, I) (the reparameterization trick),
and the analytic D[Q(z|X) || P(z)] against the prior P(z) = N(0, I).
"""

from __future__ import annotations

import keras
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions


def prior(latent_dim: int, dtype=tf.float32) -> tfd.Distribution:
    """P(z) = N(0, I)."""
    return tfd.MultivariateNormalDiag(loc=tf.zeros([latent_dim], dtype),
                                      scale_diag=tf.ones([latent_dim], dtype))


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
    """

    def __init__(self, beta: float = 1.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.beta_value = float(beta)  # the configured weight (kept for get_config)
        self.seed = seed
        self.calls = self.add_weight(name="calls", shape=(), dtype="int32", trainable=False,
                                     initializer="zeros", aggregation="only_first_replica")
        self.beta = self.add_weight(name="beta", shape=(), trainable=False,
                                    initializer=keras.initializers.Constant(beta))
        self.kl_tracker = keras.metrics.Mean(name="kl_loss")  # unweighted D[Q(z|X) || P(z)]

    def call(self, inputs, training=None):
        loc, scale = inputs  # (B, latent_dim) each, scale > 0
        loc = tf.cast(loc, tf.float32)  # the posterior and KL stay float32 under mixed precision
        scale = tf.cast(scale, tf.float32)
        q = tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)
        kl = tf.reduce_mean(tfd.kl_divergence(q, prior(loc.shape[-1])))  # mean over the batch
        self.add_loss(self.beta * kl)
        self.kl_tracker.update_state(kl)
        # Reparameterized: z = loc + scale * eps, so gradients flow into loc and scale.
        replica = tf.distribute.get_replica_context()
        replica_id = replica.replica_id_in_sync_group if replica is not None else 0
        # Each replica draws its own eps; one device draws exactly what replica 0 would.
        seed = tf.stack([(self.seed or 0) + 1_000_003 * tf.cast(replica_id, tf.int32),
                         self.calls.value])
        self.calls.assign_add(1)
        return q.sample(seed=seed)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "beta": self.beta_value, "seed": self.seed}
