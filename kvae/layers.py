"""The posterior layer: Q(z|X) as a TFP distribution, a reparameterized sample, and the KL term.

Doersch, "Tutorial on Variational Autoencoders" (2016), section 2.2: Q(z|X) = N(mu(X), Sigma(X))
with diagonal Sigma, z = mu + Sigma^(1/2) * eps with eps ~ N(0, I) (the reparameterization trick),
and the analytic D[Q(z|X) || P(z)] against the prior P(z) = N(0, I).

With `components` K > 0 the prior is instead a mixture of K diagonal Gaussians learned with the
model (its weights, means and scales are weights of this layer; Tomczak & Welling 2018, "VAE
with a VampPrior", section 3, compare it with N(0, I)), and the KL term is the single-sample
estimate log Q(z|X) - log P(z) at the reparameterized z (no closed form for a mixture).

Backend-portable: under `KERAS_BACKEND=jax` the distributions come from
`tensorflow_probability.substrates.jax` (no TensorFlow needed), under TensorFlow from
`tensorflow_probability`; the layer, its weights and its `.keras` file are the same.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

REPLICA_STRIDE = 1_000_003  # seed offset between tf.distribute replicas


def distributions():
    """`tfp.distributions` for the running Keras backend (JAX substrate under jax)."""
    if keras.backend.backend() == "jax":
        from tensorflow_probability.substrates import jax as tfp
    else:
        import tensorflow_probability as tfp
    return tfp.distributions


MIN_SCALE = 1e-3  # floor on a learned prior component's standard deviation (as kvae.prior's)


def prior(latent_dim: int):
    """P(z) = N(0, I)."""
    return distributions().MultivariateNormalDiag(loc=ops.zeros([latent_dim], "float32"),
                                                  scale_diag=ops.ones([latent_dim], "float32"))


def mixture(logits, loc, scale):
    """The mixture of diagonal Gaussians with component weights softmax(logits) (K,), means
    `loc` and standard deviations `scale` (K, D), as a TFP distribution over z (B, D)."""
    tfd = distributions()
    return tfd.MixtureSameFamily(tfd.Categorical(logits=logits),
                                 tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale))


@keras.saving.register_keras_serializable(package="kvae")
class Posterior(keras.layers.Layer):
    """Takes the encoder's (loc, scale), returns z ~ Q(z|X) and adds beta * KL with `add_loss`.

    The KL is the analytic `tfd.kl_divergence(Q(z|X), P(z))` (with a learned mixture prior, the
    estimate log Q(z|X) - log P(z) at the sampled z), averaged over the batch, so the model's
    total loss is the negative ELBO when beta = 1. `beta` is a non-trainable variable so
    a warm-up callback can change it between epochs without retracing.

    Args:
      beta: weight of the KL term.
      seed: seeds eps. Each call draws eps from the stateless seed (seed, calls so far); the call
        counter is a weight saved with the model, so a resumed run continues the same eps stream.
      components: K > 0 learns the prior P(z) as a mixture of K diagonal Gaussians (means drawn
        from N(0, I) with `seed`, unit scales, equal weights at the start); 0 = N(0, I).
      free_bits: free bits (Kingma et al. 2016, "Improved Variational Inference with Inverse
        Autoregressive Flow", eq. 15): the loss takes max(free_bits, KL_j) for each latent
        dimension j, KL_j averaged over the batch, so a dimension's first `free_bits` nats cost
        nothing and the encoder is not pushed to switch dimensions off early. 0 = the plain KL.
        The `kl` metric is always the true D[Q(z|X) || P(z)] (the plain KL). N(0, I) prior only.
    """

    def __init__(self, beta: float = 1.0, seed: int | None = None, free_bits: float = 0.0,
                 components: int = 0, **kwargs):
        if components:  # the prior's weights stay float32 under mixed precision, as the KL does
            kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if components and free_bits:
            raise ValueError("free bits are per latent dimension of a KL against N(0, I): "
                             "not with a learned mixture prior")
        self.beta_value = float(beta)  # the configured weight (kept for get_config)
        self.seed = seed
        self.free_bits = float(free_bits)
        self.components = int(components)
        self.calls = self.add_weight(name="calls", shape=(), dtype="int32", trainable=False,
                                     initializer="zeros", aggregation="only_first_replica")
        self.beta = self.add_weight(name="beta", shape=(), trainable=False,
                                    initializer=keras.initializers.Constant(beta))
        self.kl = None  # the last batch's unweighted D[Q(z|X) || P(z)] (see `call`)

    def build(self, input_shape):
        if self.components:  # the learned prior's parameters
            k, d = self.components, int(input_shape[0][-1])
            self.prior_logits = self.add_weight(name="prior_logits", shape=(k,), initializer="zeros")
            self.prior_loc = self.add_weight(name="prior_loc", shape=(k, d), initializer=keras.initializers.RandomNormal(
                stddev=1.0, seed=self.seed))
            self.prior_scale_raw = self.add_weight(  # softplus(raw) + MIN_SCALE = 1 at the start
                name="prior_scale_raw", shape=(k, d),
                initializer=keras.initializers.Constant(float(np.log(np.expm1(1.0 - MIN_SCALE)))))
        super().build(input_shape)

    def prior_scale(self):
        return ops.softplus(self.prior_scale_raw) + MIN_SCALE

    def prior_distribution(self, latent_dim: int):
        """P(z): the learned mixture, or N(0, I)."""
        if not self.components:
            return prior(latent_dim)
        return mixture(ops.convert_to_tensor(self.prior_logits), ops.convert_to_tensor(self.prior_loc),
                       self.prior_scale())

    def mixture_prior(self) -> dict | None:
        """The learned prior as kvae.prior's mixture (numpy: weights, loc, scale), or None for N(0, I)."""
        if not self.components:
            return None
        weights = ops.convert_to_numpy(ops.softmax(self.prior_logits)).astype(np.float64)
        return {"weights": weights, "loc": ops.convert_to_numpy(self.prior_loc).astype(np.float64),
                "scale": ops.convert_to_numpy(self.prior_scale()).astype(np.float64)}

    def call(self, inputs, training=None):
        tfd = distributions()
        loc, scale = inputs  # (B, latent_dim) each, scale > 0
        loc = ops.cast(loc, "float32")  # the posterior and KL stay float32 under mixed precision
        scale = ops.cast(scale, "float32")
        q = tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)
        # Reparameterized: z = loc + scale * eps, so gradients flow into loc and scale.
        # Each tf.distribute replica draws its own eps; one device draws what replica 0 would.
        seed = ops.stack([(self.seed or 0) + REPLICA_STRIDE * _replica_id(), self.calls.value])
        self.calls.assign_add(1)
        if keras.backend.backend() == "jax":
            seed = ops.cast(seed, "uint32")  # a raw JAX PRNG key
        z = q.sample(seed=seed)
        if self.components:  # no closed form: log Q(z|X) - log P(z) at this z, mean over the batch
            kl = ops.mean(q.log_prob(z) - self.prior_distribution(loc.shape[-1]).log_prob(z))
        else:
            kl = ops.mean(tfd.kl_divergence(q, prior(loc.shape[-1])))  # mean over the batch
        penalized = kl
        if self.free_bits:  # per dimension: Q's marginals against N(0, 1), batch-averaged
            kl_dims = ops.mean(tfd.kl_divergence(tfd.Normal(loc, scale), tfd.Normal(0.0, 1.0)), axis=0)
            penalized = ops.sum(ops.maximum(kl_dims, self.free_bits))
        self.add_loss(ops.cast(self.beta, "float32") * penalized)
        # For the model's kl_loss metric: metrics update in compute_loss, the one place where
        # every backend (JAX's stateless training step included) lets them change.
        self.kl = kl
        return z

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "beta": self.beta_value, "seed": self.seed,
                "free_bits": self.free_bits, "components": self.components}


def _replica_id():
    """This tf.distribute replica's index (0 outside tf.distribute and on other backends)."""
    if keras.backend.backend() != "tensorflow":
        return 0
    import tensorflow as tf

    replica = tf.distribute.get_replica_context()
    return ops.cast(replica.replica_id_in_sync_group, "int32") if replica is not None else 0
