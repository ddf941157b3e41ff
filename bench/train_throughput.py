"""python bench/train_throughput.py [--epochs 4] [--rounds 3] [--arch conv] [--batch-size 128] [--steps-per-execution 8] [--results FILE]

Training samples/second of kvae's own path (kvae.data pipeline + VAE.fit with the TFP posterior,
compiled exactly as `python -m kvae.fit` compiles it on this device: XLA on with a GPU and off on
CPU unless --jit says otherwise, steps_per_execution the largest divisor of the epoch's steps up
to --steps-per-execution) against a reference written the way the Keras VAE example (keras-io,
"Variational AutoEncoder", fchollet) writes it: a custom `train_step` with `tf.GradientTape`, a
Sampling layer, numpy arrays passed to `fit`, default `compile()` (Keras's "auto" XLA: on with a
GPU). Same architecture (kvae.model's encoder and decoder), batch size, data (mnist-5k, the same
statically binarized images for both) and epochs. Runs alternate (reference, kvae, reference,
kvae, ...) so both see the same machine load; the first epoch of each run (tracing/compilation)
is timed separately and excluded.

Prints one line per run and the ratio kvae / reference; writes bench/results/train_throughput.json
with what each side ran (XLA on/off and steps per execution, read back from the compiled models)
and the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kvae import data as kdata
from kvae import fit as kvae_fit
from kvae.config import ARCHS, Config
from kvae.files import atomic_write_json
from kvae.model import build_decoder_net, build_encoder, build_vae

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py, also when loaded by path
import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class Sampling(keras.layers.Layer):
    """The keras-io example's layer: z = z_mean + exp(0.5 * z_log_var) * eps."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        eps = keras.random.normal(tf.shape(z_mean), seed=self.seed_generator)
        return z_mean + tf.exp(0.5 * z_log_var) * eps


class ReferenceVAE(keras.Model):
    """The keras-io example's model: custom train_step with tf.GradientTape."""

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.decoder = encoder, decoder
        self.sampling = Sampling()
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.kl_loss_tracker]

    def train_step(self, data):
        with tf.GradientTape() as tape:
            z_mean, scale = self.encoder(data)
            z_log_var = 2 * tf.math.log(scale)  # same encoder heads as kvae (softplus scale)
            z = self.sampling([z_mean, z_log_var])
            reconstruction = self.decoder(z)
            reconstruction_loss = tf.reduce_mean(tf.reduce_sum(
                keras.losses.binary_crossentropy(data, reconstruction, axis=-1), axis=(1, 2)))
            kl_loss = -0.5 * (1 + z_log_var - tf.square(z_mean) - tf.exp(z_log_var))
            kl_loss = tf.reduce_mean(tf.reduce_sum(kl_loss, axis=1))
            total_loss = reconstruction_loss + kl_loss
        grads = tape.gradient(total_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {m.name: m.result() for m in self.metrics}


class EpochClock(keras.callbacks.Callback):
    """Wall-clock time at the start of training and at the end of every epoch."""

    def on_train_begin(self, logs=None):
        self.times = [time.perf_counter()]

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter())


def _rates(clock: EpochClock, samples_per_epoch: int) -> tuple[float, float]:
    """(first-epoch seconds, samples/second over the later epochs)."""
    t = clock.times
    return t[1] - t[0], samples_per_epoch * (len(t) - 2) / (t[-1] - t[1])


def compiled_as(model: keras.Model) -> dict:
    """What a compiled model runs: XLA on/off (Keras's resolved value) and steps per execution."""
    return {"jit_compile": bool(model.jit_compile), "steps_per_execution": int(model.steps_per_execution)}


def kvae_compile_options(config: Config, steps: int) -> dict:
    """`compile()` arguments exactly as kvae.fit resolves them on this device (one replica)."""
    return kvae_fit.compile_options(config, steps, kvae_fit.accelerators(), keras.backend.backend())


def reference_run(x: np.ndarray, config: Config, epochs: int) -> tuple[float, float, dict]:
    encoder = build_encoder(x.shape[1:], config.latent_dim, config.arch, config.hidden, config.filters)
    net = build_decoder_net(x.shape[1:], config.latent_dim, config.arch, config.hidden, config.filters)
    z = keras.Input((config.latent_dim,))
    decoder = keras.Model(z, keras.layers.Activation("sigmoid")(net(z)))
    model = ReferenceVAE(encoder, decoder)
    model.compile(optimizer=keras.optimizers.Adam())  # the example's defaults (jit_compile="auto")
    clock = EpochClock()
    model.fit(x, epochs=epochs, batch_size=config.batch_size, verbose=0, callbacks=[clock])
    return (*_rates(clock, len(x)), compiled_as(model))


def kvae_run(x: np.ndarray, config: Config, epochs: int) -> tuple[float, float, dict]:
    vae = build_vae(config, x.shape[1:])
    x_uint8 = (x * 255).round().astype(np.uint8)
    ds, steps = kdata.train_dataset(x_uint8, config.batch_size, "static", config.seed, 0, epochs)
    vae.compile(optimizer=keras.optimizers.Adam(config.lr), **kvae_compile_options(config, steps))
    clock = EpochClock()
    vae.fit(ds, epochs=epochs, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[clock])
    return (*_rates(clock, steps * config.batch_size), {**compiled_as(vae), "steps_per_epoch": steps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is excluded)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating (reference, kvae) pairs")
    parser.add_argument("--arch", default="conv", choices=ARCHS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps-per-execution", type=int, default=Config.steps_per_execution,
                        help="kvae's --steps-per-execution (default: kvae's; results of another "
                             "value go to train_throughput-speN.json)")
    parser.add_argument("--jit", choices=("auto", "on", "off"), default="auto",
                        help="kvae's XLA setting (default auto: as kvae.fit, on with a GPU)")
    parser.add_argument("--results", default=None,
                        help="JSON file to write (default bench/results/train_throughput[-speN].json)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is excluded from the rate)")
    # P(z) = N(0, I) on both sides: the reference's closed-form KL, kvae's Posterior layer
    config = Config(arch=args.arch, batch_size=args.batch_size, prior_mixture=0,
                    steps_per_execution=args.steps_per_execution,
                    jit={"auto": None, "on": True, "off": False}[args.jit])
    d = kdata.load("mnist-5k")
    x = kdata.binarize_fixed(d.x_train, "static")  # the same binary images for both
    gpus = kvae_fit.accelerators()
    device = "GPU: " + ", ".join(gpus) if gpus else f"CPU ({machine.cpu_model()})"
    print(f"device {device}", flush=True)
    runs = {"reference": [], "kvae": []}
    ran = {"reference": [], "kvae": []}
    for r in range(args.rounds):
        for name, run in (("reference", reference_run), ("kvae", kvae_run)):
            keras.utils.clear_session()
            first, rate, compiled = run(x, config, args.epochs)
            runs[name].append(rate)
            ran[name].append(compiled)
            print(f"round {r + 1} {name:9s}: {rate:8.0f} samples/s (first epoch {first:.1f} s; "
                  f"{', '.join(f'{k} {v}' for k, v in compiled.items())})", flush=True)
    ref, ours = statistics.median(runs["reference"]), statistics.median(runs["kvae"])
    ratios = [k / r for k, r in zip(runs["kvae"], runs["reference"])]
    print(f"median: kvae {ours:.0f} samples/s, reference {ref:.0f} samples/s, "
          f"ratio {ours / ref:.2f}x (per round: {', '.join(f'{q:.2f}' for q in ratios)})")
    for name, compiled in ran.items():  # every round of a side compiles the same way
        assert all(c == compiled[0] for c in compiled), (name, compiled)
    result = {"device": "GPU" if gpus else "CPU", "devices": gpus or [device],
              "machine": machine.describe(), "arch": args.arch,
              "batch_size": args.batch_size, "epochs": args.epochs, "rounds": args.rounds,
              "samples_per_second": runs, "median_ratio": ours / ref, "round_ratios": ratios,
              # read back from the compiled models: what ran, not what was asked for
              "kvae_path": {**ran["kvae"][0], "jit_asked": args.jit,
                            "steps_per_execution_asked": config.steps_per_execution},
              "reference_path": ran["reference"][0]}
    spe = config.steps_per_execution
    name = "train_throughput.json" if spe == Config.steps_per_execution else f"train_throughput-spe{spe}.json"
    path = Path(args.results) if args.results else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
