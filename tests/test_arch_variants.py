"""bench/arch_variants.py: the architecture variants of the issue-16 sweep build what they say."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bench_scripts import load_script

variants = load_script("arch_variants")


def _weights(model):
    return [w.numpy() if hasattr(w, "numpy") else np.asarray(w) for w in model.get_weights()]


def test_the_resnet_control_is_kvaes_resnet(monkeypatch):
    """Same layers in the same order: the same weights for a seed, so its rows are comparable."""
    import kvae.model as kmodel
    from kvae.config import Config

    config = Config(arch="resnet", seed=3)
    keras.utils.set_random_seed(3)
    shipped = kmodel.build_vae(config, (28, 28, 1))
    monkeypatch.setattr(kmodel, "build_encoder", kmodel.build_encoder)  # restored after the test
    monkeypatch.setattr(kmodel, "build_decoder_net", kmodel.build_decoder_net)
    variants.use("resnet")
    keras.utils.set_random_seed(3)
    control = kmodel.build_vae(config, (28, 28, 1))
    for half in ("encoder", "decoder_net"):
        a, b = getattr(shipped, half), getattr(control, half)
        assert [type(layer).__name__ for layer in a.layers] == [type(layer).__name__ for layer in b.layers]
        for wa, wb in zip(_weights(a), _weights(b), strict=True):
            np.testing.assert_array_equal(wa, wb)


@pytest.mark.parametrize("name", sorted(variants.VARIANTS))
def test_each_variant_builds_a_28x28_vae(name, monkeypatch):
    import kvae.model as kmodel
    from kvae.config import Config

    monkeypatch.setattr(kmodel, "build_encoder", kmodel.build_encoder)
    monkeypatch.setattr(kmodel, "build_decoder_net", kmodel.build_decoder_net)
    variants.use(name)
    vae = kmodel.build_vae(Config(arch="resnet", latent_dim=4, hidden=16, filters=4), (28, 28, 1))
    x = (np.random.default_rng(0).random((2, 28, 28, 1)) < 0.5).astype("float32")
    loc, scale = vae.encode(x)
    assert tuple(loc.shape) == (2, 4) and np.all(np.asarray(scale) > 0)
    assert tuple(vae.decode(loc).shape) == (2, 28, 28, 1)


def test_subpixel_output_puts_each_channel_at_its_offset():
    """The sub-pixel rearrangement is depth-to-space: channel 2 * dr + dc -> pixel (2r + dr, 2c + dc)."""
    encoder, decoder_net = variants.builders(output="subpixel")
    net = decoder_net((28, 28, 1), 2, "resnet", hidden=8, filters=2)
    rearrange = keras.Model(net.layers[-5].output, net.layers[-2].output)  # Reshape .. Reshape
    maps = np.arange(14 * 14 * 4, dtype="float32").reshape(1, 14, 14, 4)
    image = np.asarray(rearrange(maps))[0, :, :, 0]
    for r, c, dr, dc in [(0, 0, 0, 1), (3, 5, 1, 0), (13, 13, 1, 1)]:
        assert image[2 * r + dr, 2 * c + dc] == maps[0, r, c, 2 * dr + dc]


def test_epoch_times_has_conv_and_each_variant():
    times = variants.epoch_times(["px"], rounds=1, n=128)
    assert set(times) == {"conv", "px"} and all(t > 0 for t in times.values())
