"""python bench/arch_variants.py VARIANT NAME [quality_sweep flags]  |  --time [VARIANT ...]

Architecture variants of `--arch resnet` that kvae does not ship, for the quality sweep of
issue 16 (docs/benchmarks.md, "A better model"). A variant replaces kvae.model's
build_encoder / build_decoder_net in this process with the builders below, then

  VARIANT NAME [flags]  runs bench/quality_sweep.py NAME [flags] with them (one row appended to
                        bench/results/quality_sweep.jsonl, its `variant` named there);
  --time [VARIANT ...]  times one training epoch of each (4,480 random binary images, batch 64)
                        next to conv's, in interleaved rounds (the minimum of --rounds): the
                        step-time ratio the 1.25x budget is about, measured in one process.

`resnet` builds today's --arch resnet (the control: same layers in the same order, so the same
weights for a seed); every other variant names what it changes. Unconditional only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import keras
import numpy as np
from keras import layers

import kvae.model as kmodel
from kvae.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/quality_sweep.py


def builders(act: str = "relu", encoder_blocks: tuple = (), decoder_blocks_7: int = 1,
             channels_14: int = 1, channels_28: int | None = None, output: str = "transposed",
             z_skip: bool = False):
    """(build_encoder, build_decoder_net) with kvae.model's signatures for one variant.

    Args:
      act: the hidden layers' activation.
      encoder_blocks: the encoder's residual blocks, by the side of their feature maps (14, 7).
      decoder_blocks_7: residual blocks at 7 x 7 in the decoder.
      channels_14: the decoder's 14 x 14 stage has channels_14 * filters channels.
      channels_28: channels of the 28 x 28 transposed convolution (default: filters).
      output: `transposed` (today's: 3x3 transposed convolutions to 28 x 28, then to one channel)
        or `subpixel` (a 3x3 convolution at 14 x 14 to 4 channels, rearranged to 28 x 28 x 1).
      z_skip: z also enters the 7 x 7 and 14 x 14 stages, through a dense layer each (added).
    """
    def residual(h, channels):
        r = layers.Conv2D(channels, 3, padding="same", activation=act)(h)
        r = layers.Conv2D(channels, 3, padding="same")(r)
        return layers.Activation(act)(layers.Add()([h, r]))

    def encoder(image_shape, latent_dim, arch, hidden=256, filters=16, num_classes=0, **_):
        x = keras.Input(image_shape, name="x")
        h = layers.Conv2D(filters, 3, strides=2, padding="same", activation=act)(x)
        if 14 in encoder_blocks:
            h = residual(h, filters)
        h = layers.Conv2D(2 * filters, 3, strides=2, padding="same", activation=act)(h)
        if 7 in encoder_blocks:
            h = residual(h, 2 * filters)
        h = layers.Dense(hidden, activation=act)(layers.Flatten()(h))
        loc = layers.Dense(latent_dim, name="loc", dtype="float32")(h)
        scale = layers.Dense(latent_dim, activation="softplus", name="scale", dtype="float32")(h)
        return keras.Model(x, [loc, scale], name="encoder")

    def decoder_net(image_shape, latent_dim, arch, hidden=256, filters=16, num_classes=0, **_):
        if tuple(image_shape) != (28, 28, 1):
            raise ValueError(f"bench/arch_variants.py builds 28 x 28 x 1 models, not {image_shape}")
        z = keras.Input((latent_dim,), name="z")

        def with_z(h):
            if not z_skip:
                return h
            return layers.Add()([h, layers.Reshape(h.shape[1:])(layers.Dense(int(np.prod(h.shape[1:])))(z))])

        h = layers.Dense(hidden, activation=act)(z)
        h = layers.Dense(7 * 7 * 2 * filters, activation=act)(h)
        h = layers.Reshape((7, 7, 2 * filters))(h)
        for _ in range(decoder_blocks_7):
            h = residual(h, 2 * filters)
        h = with_z(h)
        h = layers.Conv2DTranspose(channels_14 * filters, 3, strides=2, padding="same", activation=act)(h)
        h = residual(with_z(h), channels_14 * filters)
        if output == "subpixel":
            h = layers.Conv2D(4, 3, padding="same")(h)
            h = layers.Reshape((14, 14, 2, 2))(h)  # (row, col, row offset, col offset)
            h = layers.Permute((1, 3, 2, 4))(h)
            h = layers.Reshape((28, 28, 1))(h)
        else:
            h = layers.Conv2DTranspose(channels_28 or filters, 3, strides=2, padding="same", activation=act)(h)
            h = layers.Conv2DTranspose(1, 3, padding="same", dtype="float32")(h)
        return keras.Model(z, layers.Identity(name="logits", dtype="float32")(h), name="decoder_net")

    return encoder, decoder_net


VARIANTS = {
    "resnet": {},  # today's --arch resnet, the control
    "elu": {"act": "elu"},
    "elu_e7": {"act": "elu", "encoder_blocks": (7,)},
    "e7": {"encoder_blocks": (7,)},
    "deep7": {"encoder_blocks": (7,), "decoder_blocks_7": 2},
    "resnet2": {"encoder_blocks": (14, 7)},  # the second --arch resnet (commit 8defb13)
    "resnet2_px": {"encoder_blocks": (14, 7), "output": "subpixel"},
    "resnet1": {"encoder_blocks": (14, 7), "channels_14": 2},  # like the first (commit 5d8001f)
    "px": {"output": "subpixel"},
    "e7_px": {"encoder_blocks": (7,), "output": "subpixel"},
    "w14_c8": {"channels_14": 2, "channels_28": 8},
    "zskip": {"z_skip": True},
}


def use(variant: str) -> None:
    """Makes kvae.model.build_vae build `variant` (in this process)."""
    kmodel.build_encoder, kmodel.build_decoder_net = builders(**VARIANTS[variant])


def epoch_times(variants: list[str], rounds: int = 3, n: int = 4480, seed: int = 0) -> dict[str, float]:
    """Seconds per training epoch of each variant and of conv (key "conv"): the minimum over
    `rounds` interleaved rounds, after one warm-up epoch each, all in this process."""
    x = (np.random.default_rng(seed).random((n, 28, 28, 1)) < 0.2).astype("float32")
    original = kmodel.build_encoder, kmodel.build_decoder_net
    models = {}
    try:
        for name in ["conv", *variants]:
            if name == "conv":
                kmodel.build_encoder, kmodel.build_decoder_net = original
            else:
                use(name)
            vae = kmodel.build_vae(Config(arch="conv" if name == "conv" else "resnet"), (28, 28, 1))
            vae.compile(optimizer=keras.optimizers.Adam(1e-3), steps_per_execution=7)
            vae.fit(x, batch_size=64, epochs=1, verbose=0)
            models[name] = vae
    finally:
        kmodel.build_encoder, kmodel.build_decoder_net = original
    seconds = {name: [] for name in models}
    for _ in range(rounds):
        for name, vae in models.items():
            start = time.perf_counter()
            vae.fit(x, batch_size=64, epochs=1, verbose=0)
            seconds[name].append(time.perf_counter() - start)
    return {name: min(each) for name, each in seconds.items()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--time":
        parser = argparse.ArgumentParser(prog="bench/arch_variants.py --time",
                                         description="step time of variants next to conv's")
        parser.add_argument("variants", nargs="*", choices=list(VARIANTS), metavar="VARIANT",
                            help=f"default: all ({', '.join(VARIANTS)})")
        parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
        args = parser.parse_args(sys.argv[2:])
        times = epoch_times(args.variants or list(VARIANTS), args.rounds)
        for name, seconds in times.items():
            print(f"{name:12s} {seconds:6.2f} s/epoch  {seconds / times['conv']:.2f}x conv", flush=True)
        return
    if len(sys.argv) < 3 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: python bench/arch_variants.py VARIANT NAME [quality_sweep flags] | --time "
                 f"[VARIANT ...]; VARIANT is one of {', '.join(VARIANTS)}")
    variant = sys.argv.pop(1)
    use(variant)
    import quality_sweep

    quality_sweep.main(variant)


if __name__ == "__main__":
    main()
