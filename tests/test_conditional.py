"""The conditional VAE (Doersch section 4): labels, batches, the model, -log P(X|y), the CLI.

Q(z|X, y) and P(X|z, y) take the one-hot class label y as a second input. What can go wrong
without anyone noticing: a label that belongs to another image (a shuffle that moves images
without their labels), an unconditional model that changed on the way, and a condition that is
silently dropped (the model still trains, only worse). Each of these fails a test here; for the
last one, test_a_decoder_that_ignores_y_fails_the_checks shows that a decoder that ignores y
fails the checks of test_the_label_lowers_the_nll.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvae import data as kdata
from kvae.config import Config
from kvae.errors import KVAEError
from kvae.model import build_decoder_net  # the real one (a test patches kvae.model's)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Helpers


def write_png(path: Path, value: int, size=(4, 4)) -> None:
    """A grey PNG whose every pixel is `value` (so a test can tell which image it got)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8), mode="L").save(path)


def fit_main_fails(argv: list[str], capsys) -> str:
    """Runs `python -m kvae.fit ARGV` in this process; asserts exit 2 with one line and returns it."""
    from kvae.fit import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvae.fit: error: "), err
    return lines[0]


def indexed_images(n: int) -> np.ndarray:
    """(n, 3, 2, 1) uint8 images whose pixels all hold 10 * index: an image names itself."""
    return (np.arange(n)[:, None, None, None] * 10 + np.zeros((1, 3, 2, 1))).astype(np.uint8)


def index_of(xb) -> np.ndarray:
    """A batch of `indexed_images` (as 0..1 floats, not binarized) -> their indices."""
    return np.round(np.asarray(xb)[:, 0, 0, 0] * 25.5).astype(int)


# ----------------------------------------------------------------------------------------------
# 1. Labels


def test_mnist_5k_has_ten_digit_classes_for_every_image():
    d = kdata.load("mnist-5k")
    assert d.class_names == tuple(str(i) for i in range(10)) and d.num_classes == 10
    train, val = d.labels("train"), d.labels("val")
    assert train.shape == (4500,) and val.shape == (500,) and train.dtype == np.int64
    assert set(train.tolist()) == set(val.tolist()) == set(range(10))


def test_npz_labels_of_any_value_become_sorted_ids(tmp_path):
    y = np.array([7, 3] * 10)
    x = np.repeat(y[:, None, None], 4, 1).repeat(4, 2).astype(np.uint8)  # pixel value = label
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = kdata.load(str(tmp_path / "d.npz"), val_size=4)
    assert d.class_names == ("3", "7") and d.num_classes == 2
    for images, ids in ((d.x_train, d.labels("train")), (d.x_val, d.labels("val"))):
        assert len(ids) == len(images)
        np.testing.assert_array_equal(ids, (images[:, 0, 0, 0] == 7).astype(int))  # 3 -> 0, 7 -> 1
    np.savez(tmp_path / "s.npz", x=x, y=np.where(y == 7, "dog", "cat"))
    assert kdata.load(str(tmp_path / "s.npz"), val_size=4).class_names == ("cat", "dog")


def test_tfds_labels_are_named_by_its_class_label(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=30):
        d = kdata.load("mnist", data_dir=str(tmp_path), val_size=10)
    assert d.class_names == tuple(str(i) for i in range(10))
    assert d.labels("train").shape == (20,) and d.labels("val").shape == (10,)
    assert d.labels("train").min() >= 0 and d.labels("train").max() <= 9


def test_image_folder_classes_are_its_sub_folders(tmp_path):
    for c, count in (("b_dog", 4), ("a_cat", 3), ("c_owl", 2)):
        for i in range(count):
            write_png(tmp_path / "f" / c / f"{i}.png", 100 + 50 * "abc".index(c[0]))
    d = kdata.load(str(tmp_path / "f"), val_size=2)
    assert d.class_names == ("a_cat", "b_dog", "c_owl") and d.num_classes == 3
    for images, ids in ((np.asarray(d.x_train), d.labels("train")), (d.x_val, d.labels("val"))):
        np.testing.assert_array_equal(ids, (images[:, 0, 0, 0].astype(int) - 100) // 50)
    assert len(d.labels("train")) + len(d.labels("val")) == 9


@pytest.mark.parametrize("case", ["npz-without-y", "folder-without-sub-folders", "image-in-root"])
def test_conditional_without_labels_is_one_line(case, tmp_path, capsys):
    if case == "npz-without-y":
        np.savez(tmp_path / "d.npz", x=np.zeros((9, 4, 4), np.uint8))
        dataset = str(tmp_path / "d.npz")
        wanted = r"has none: use mnist-5k, .*'y'.*sub-folder per class"
    else:
        for i in range(6):
            write_png(tmp_path / "f" / ("" if case == "folder-without-sub-folders" else f"c{i % 2}")
                      / f"{i}.png", 10 * i)
        if case == "image-in-root":
            write_png(tmp_path / "f" / "stray.png", 200)
        dataset = str(tmp_path / "f")
        wanted = ("has none: use" if case == "folder-without-sub-folders"
                  else r"1 of \d+ (train|val) images have no class label")
    out = tmp_path / "run"
    line = fit_main_fails(["--conditional", "--dataset", dataset, "--val-size", "2", "--arch",
                           "mlp", "--epochs", "1", "--out", str(out)], capsys)
    assert re.search(wanted, line), line
    assert "--conditional" in line, line
    assert not out.exists(), sorted(out.rglob("*"))  # nothing written, not even the folder
    if case == "image-in-root":  # it loads (labels are needed only for --conditional): id -1
        d = kdata.load(dataset, val_size=2)
        assert d.num_classes == 2 and -1 in np.concatenate([d.y_train, d.y_val])
        with pytest.raises(KVAEError, match="no class label"):
            d.labels("train") if -1 in d.y_train else d.labels("val")


# ----------------------------------------------------------------------------------------------
# 2. Batches

# Image indices of the batches of indexed_images(24), batch 5, seed 3, epochs 0-1, computed with
# the code before the conditional change (git show 70e7ca1:kvae/data.py): unconditional batches
# must stay exactly these.
BEFORE_TF = [12, 20, 8, 11, 19, 7, 21, 23, 14, 16, 1, 4, 18, 3, 9, 2, 5, 10, 17, 15,
             23, 18, 10, 12, 5, 20, 1, 17, 22, 4, 14, 0, 16, 15, 6, 13, 8, 21, 9, 19]
BEFORE_NUMPY = [13, 12, 15, 23, 0, 17, 3, 22, 8, 9, 18, 6, 1, 10, 2, 11, 20, 16, 14, 4,
                13, 10, 11, 2, 20, 14, 9, 5, 7, 6, 16, 12, 4, 23, 0, 3, 18, 17, 1, 15]


def as_stream(x: np.ndarray) -> kdata.Stream:
    import tensorflow as tf

    def read(a, b):
        return tf.data.Dataset.from_tensor_slices(x[a:b])

    return kdata.Stream("s", len(x), x.shape[1:], read, "k")


def batches(source: str, x, binarize: str, y=None, num_classes: int = 0) -> list:
    """Every batch of 2 epochs as numpy: [xb] or [(xb, yb)]."""
    if source == "numpy":
        gen, steps = kdata.train_batches(x, 5, binarize, 3, 0, 2, y=y, num_classes=num_classes)
        items = list(gen)
    else:
        ds, steps = kdata.train_dataset(as_stream(x) if source == "stream" else x, 5, binarize, 3, 0, 2,
                                        y=y, num_classes=num_classes)
        import tensorflow as tf

        items = [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds]
        items = [b if y is not None else (b,) for b in items]  # tf.data gives xb alone
    assert steps == 4 and len(items) == 8
    assert all(isinstance(b, tuple) and len(b) == 1 for b in items), "each batch is a 1-tuple"
    return [b[0] for b in items]


@pytest.mark.parametrize("source", ["array", "stream", "numpy"])
def test_batches_carry_their_own_labels_through_the_shuffle(source):
    x, y = indexed_images(24), np.arange(24) % 3
    plain = batches(source, x, "none")
    order = np.concatenate([index_of(xb) for xb in plain])
    assert order.tolist() == (BEFORE_NUMPY if source == "numpy" else BEFORE_TF)  # unchanged
    labelled = batches(source, x, "none", y=y, num_classes=3)
    for xb, (xc, yc) in zip(plain, labelled):
        np.testing.assert_array_equal(xc, xb)  # the same images in the same order as without y
        assert yc.shape == (5, 3) and yc.dtype == np.float32
        assert set(np.unique(yc)) == {0.0, 1.0} and np.all(yc.sum(1) == 1)  # one-hot
        np.testing.assert_array_equal(yc.argmax(1), index_of(xc) % 3)  # each x with its own y


@pytest.mark.parametrize("source", ["array", "stream", "numpy"])
def test_dynamic_binarization_is_the_same_with_labels(source):
    x = (np.random.default_rng(0).random((24, 3, 2, 1)) * 255).astype(np.uint8)
    plain = batches(source, x, "dynamic")
    labelled = batches(source, x, "dynamic", y=np.arange(24) % 4, num_classes=4)
    assert sum(float(xb.sum()) for xb in plain) > 0
    for xb, (xc, _) in zip(plain, labelled):
        np.testing.assert_array_equal(xc, xb)


def test_eval_batches_pair_each_image_with_its_label():
    x, y = indexed_images(23), np.arange(23) % 5
    items = list(kdata.eval_dataset(x, 10, "none", y=y, num_classes=5).as_numpy_iterator())
    assert [len(b) for b in items] == [1, 1, 1] and [len(b[0][0]) for b in items] == [10, 10, 3]
    xs = np.concatenate([b[0][0] for b in items])
    ys = np.concatenate([b[0][1] for b in items])
    assert index_of(xs).tolist() == list(range(23)) and ys.argmax(1).tolist() == (y % 5).tolist()
    plain = np.concatenate(list(kdata.eval_dataset(x, 10, "none").as_numpy_iterator()))
    np.testing.assert_array_equal(plain, xs)


def test_one_hot_rejects_ids_outside_the_classes():
    np.testing.assert_array_equal(kdata.one_hot([2, 0], 3), [[0, 0, 1], [1, 0, 0]])
    assert kdata.one_hot(np.array([1]), 2).dtype == np.float32
    for bad in ([0, -1], [3]):  # -1 (an image without a label) would index the last class
        with pytest.raises(ValueError, match="class ids must be in 0..2"):
            kdata.one_hot(bad, 3)


# ----------------------------------------------------------------------------------------------
# 3. Model

# The unconditional halves built by the code before the conditional change (latent 5, hidden 16,
# filters 16, 28x28x1): layer types and weight shapes, which must not change.
BEFORE_LAYERS = {
    ("conv", "encoder"): (
        ["InputLayer", "Conv2D", "Conv2D", "Flatten", "Dense", "Dense", "Dense"],
        [(3, 3, 1, 16), (16,), (3, 3, 16, 32), (32,), (1568, 16), (16,), (16, 5), (5,), (16, 5), (5,)]),
    ("conv", "decoder_net"): (
        ["InputLayer", "Dense", "Dense", "Reshape", "Conv2DTranspose", "Conv2DTranspose",
         "Conv2DTranspose", "Identity"],
        [(5, 16), (16,), (16, 1568), (1568,), (3, 3, 32, 32), (32,), (3, 3, 16, 32), (16,),
         (3, 3, 1, 16), (1,)]),
    ("mlp", "encoder"): (
        ["InputLayer", "Flatten", "Dense", "Dense", "Dense", "Dense"],
        [(784, 32), (32,), (32, 16), (16,), (16, 5), (5,), (16, 5), (5,)]),
    ("mlp", "decoder_net"): (
        ["InputLayer", "Dense", "Dense", "Dense", "Reshape"],
        [(5, 16), (16,), (16, 32), (32,), (32, 784), (784,)]),
}


def small_vae(arch="conv", num_classes=0, shape=(28, 28, 1), **kw):
    from kvae.model import build_vae

    config = Config(arch=arch, latent_dim=5, hidden=16, conditional=bool(num_classes), **kw)
    return build_vae(config, shape, num_classes)


def layers_of(model):
    return [type(layer).__name__ for layer in model.layers], [tuple(w.shape) for w in model.weights]


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_unconditional_model_is_unchanged(arch):
    vae = small_vae(arch)
    assert vae.num_classes == 0
    for part in (vae.encoder, vae.decoder_net):
        assert layers_of(part) == BEFORE_LAYERS[arch, part.name]
        assert len(part.inputs) == 1
    x = np.random.default_rng(0).random((2, 28, 28, 1)).astype(np.float32)
    with pytest.raises(ValueError, match="unconditional"):
        vae.encode(x, kdata.one_hot([0, 1], 3))


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_conditional_halves_take_the_label(arch):
    vae = small_vae(arch, num_classes=3)
    assert vae.num_classes == 3
    assert [tuple(t.shape) for t in vae.encoder.inputs] == [(None, 28, 28, 1), (None, 3)]
    assert [tuple(t.shape) for t in vae.decoder_net.inputs] == [(None, 5), (None, 3)]
    assert [tuple(t.shape) for t in vae.decoder().inputs] == [(None, 5), (None, 3)]
    for part in (vae.encoder, vae.decoder_net):
        # y joins by concatenation (wherever it joins): the unconditional model's weights, with
        # each kernel that takes y wider by K = 3 on its input axis, and nothing else changed
        names, shapes = layers_of(part)
        before = BEFORE_LAYERS[arch, part.name][1]
        assert "Concatenate" in names and len(shapes) == len(before), (names, shapes)
        grown = [np.subtract(s, b) for s, b in zip(shapes, before) if s != b]
        assert grown, f"{part.name}: no weight takes y"
        assert all(len(d) > 1 and sorted(d.tolist())[-1] == 3 and np.count_nonzero(d) == 1
                   for d in grown), (shapes, before)

    rng = np.random.default_rng(0)
    x = rng.random((4, 28, 28, 1)).astype(np.float32)
    y = kdata.one_hot([0, 1, 2, 0], 3)
    loc, scale = vae.encode(x, y)
    assert loc.shape == scale.shape == (4, 5) and np.all(np.asarray(scale) > 0)
    assert vae((x, y)).shape == (4, 28, 28, 1)
    z = rng.standard_normal((4, 5)).astype(np.float32)
    a, b = np.asarray(vae.decode(z, y)), np.asarray(vae.decode(z, kdata.one_hot([1, 2, 0, 1], 3)))
    assert np.abs(a - b).max() > 1e-3  # the same z, another label: another image
    loc_b, _ = vae.encode(x, kdata.one_hot([1, 2, 0, 1], 3))
    assert np.abs(np.asarray(loc) - np.asarray(loc_b)).max() > 1e-4  # Q(z|X, y) sees y too
    with pytest.raises(ValueError, match="needs y"):
        vae.decode(z)
    with pytest.raises(ValueError, match="needs y"):
        vae.encode(x)


@pytest.mark.parametrize("arch", ["mlp", "resnet"])  # resnet: y reaches its residual blocks too
def test_conditional_train_step_reaches_every_variable(arch):
    import tensorflow as tf

    vae = small_vae(arch, num_classes=3)
    x = (np.random.default_rng(1).random((8, 28, 28, 1)) > 0.5).astype(np.float32)
    y = kdata.one_hot(np.arange(8) % 3, 3)
    with tf.GradientTape() as tape:
        logits = vae((x, y), training=True)
        loss = vae.compute_loss(x=(x, y), y_pred=logits)
    grads = tape.gradient(loss, vae.trainable_variables)
    for var, grad in zip(vae.trainable_variables, grads):
        assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0, var.path
    y_t, z = tf.constant(y), tf.random.normal((8, 5))
    with tf.GradientTape(persistent=True) as tape:  # both halves are functions of y
        tape.watch(y_t)
        loc = vae.encoder([tf.constant(x), y_t])[0]
        logits = vae.decoder_net([z, y_t])
    for out in (loc, logits):
        assert float(tf.reduce_max(tf.abs(tape.gradient(out, y_t)))) > 0


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_conditional_save_load_round_trip(tmp_path, arch):
    import keras

    from kvae.model import load_vae

    vae = small_vae(arch, num_classes=4)
    vae.save(tmp_path / "vae.keras")
    keras.saving.save_model(vae.decoder(), tmp_path / "decoder.keras")
    keras.saving.save_model(vae.encoder, tmp_path / "encoder.keras")
    loaded = load_vae(tmp_path / "vae.keras")
    assert loaded.num_classes == 4
    rng = np.random.default_rng(2)
    x = rng.random((5, 28, 28, 1)).astype(np.float32)
    z = rng.standard_normal((5, 5)).astype(np.float32)
    y = kdata.one_hot([0, 1, 2, 3, 1], 4)
    for a, b in zip(vae.encode(x, y), loaded.encode(x, y)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(vae.decode(z, y), loaded.decode(z, y), atol=1e-6)
    decoder = keras.saving.load_model(tmp_path / "decoder.keras", safe_mode=True)
    np.testing.assert_allclose(vae.decode(z, y), decoder([z, y]), atol=1e-6)
    encoder = keras.saving.load_model(tmp_path / "encoder.keras", safe_mode=True)
    np.testing.assert_allclose(vae.encode(x, y)[0], encoder([x, y])[0], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 4. The label carries information, and 5. a dropped condition is caught

# Measured (mnist-5k, mlp, latent 2, hidden 64, 5 epochs at lr 3e-3, batch 128, no KL warm-up;
# the first 200 validation images, k = 10), as the per-image gap -log P(X) - -log P(X|y):
#   seed 0: -log P(X) 171.96, -log P(X|y) 151.11: gap 20.85 +- 1.56 nats (seed 1: 20.45 +- 1.69);
#   a decoder that ignores y (decoder_ignoring_y), same settings: gap 1.50 +- 0.32 (seed 1:
#   0.16 +- 0.19). check_label_helps asks for more than 5 nats and 4 standard errors.
TRAIN = dict(arch="mlp", latent_dim=2, hidden=64, epochs=5, lr=3e-3, batch_size=128, kl_warmup=0,
             beta=1.0, seed=0)  # beta 1 for both: the conditional default (1.25) would change the gap
N_VAL, K_VAL = 200, 10


def train(mnist, conditional: bool):
    """A small model trained in this process on mnist-5k's batches (kvae.data.train_dataset)."""
    import keras

    from kvae.model import build_vae

    config = Config(**TRAIN, conditional=conditional)
    keras.utils.set_random_seed(config.seed)
    vae = build_vae(config, mnist.image_shape, mnist.num_classes if conditional else 0)
    vae.compile(optimizer=keras.optimizers.Adam(config.lr))
    train_ds, steps = kdata.train_dataset(
        mnist.x_train, config.batch_size, config.resolved_binarize, config.seed, 0, config.epochs,
        y=mnist.labels("train") if conditional else None, num_classes=mnist.num_classes)
    vae.fit(train_ds, epochs=config.epochs, steps_per_epoch=steps, verbose=0,
            shuffle=False)  # the batches are shuffled already (seeded, per epoch)
    return vae


def decoder_ignoring_y(image_shape, latent_dim, arch="conv", hidden=256, filters=32, num_classes=0,
                       dropout=0.0):
    """kvae.model.build_decoder_net with y never wired in: it takes [z, y] and uses z only."""
    import keras

    net = build_decoder_net(image_shape, latent_dim, arch, hidden, filters, dropout=dropout)  # P(X|z)
    z, y = keras.Input((latent_dim,), name="z"), keras.Input((num_classes,), name="y")
    return keras.Model([z, y], net(z), name="decoder_net")


@pytest.fixture(scope="module")
def mnist():
    return kdata.load("mnist-5k")


@pytest.fixture(scope="module")
def val(mnist):
    """The first N_VAL validation images, binarized once, with their one-hot labels."""
    return (kdata.binarize_fixed(mnist.x_val[:N_VAL], "dynamic"),
            kdata.one_hot(mnist.labels("val")[:N_VAL], mnist.num_classes))


@pytest.fixture(scope="module")
def models(mnist):
    return {"unconditional": train(mnist, False), "conditional": train(mnist, True)}


def nll(vae, val, k=K_VAL, n=N_VAL, seed=0):
    from kvae.evaluate import iwae_nll

    x, y = val
    return iwae_nll(vae, x[:n], k, seed=seed, y=y[:n] if vae.num_classes else None)["nll"]


def check_label_helps(nll_given_y: np.ndarray, nll_plain: np.ndarray) -> float:
    """Per image (the same images): -log P(X|y) is clearly below -log P(X). Returns the gap."""
    gap = nll_plain - nll_given_y
    se = gap.std(ddof=1) / np.sqrt(len(gap))
    assert gap.mean() > 5 and gap.mean() > 4 * se, f"label gap {gap.mean():.2f} +- {se:.2f} nats"
    return float(gap.mean())


def check_decoder_uses_y(vae, num_classes: int) -> float:
    """The same z decoded as each class: the images differ. Returns the mean pixel change."""
    z = np.random.default_rng(5).standard_normal((16, vae.latent_dim)).astype(np.float32)
    means = [np.asarray(vae.decode(z, kdata.one_hot(np.full(16, c), num_classes)))
             for c in range(num_classes)]
    change = float(np.mean([np.abs(m - means[0]).mean() for m in means[1:]]))
    assert change > 0.01, f"decoded images change by {change:.4f} with the label"
    return change


def test_the_label_lowers_the_nll(models, val, mnist):
    plain, given_y = nll(models["unconditional"], val), nll(models["conditional"], val)
    gap = check_label_helps(given_y, plain)
    change = check_decoder_uses_y(models["conditional"], mnist.num_classes)
    print(f"-log P(X) {plain.mean():.2f}, -log P(X|y) {given_y.mean():.2f}, gap {gap:.2f} nats; "
          f"label changes decoded pixels by {change:.3f}")


@pytest.mark.parametrize("which", ["unconditional", "conditional"])
def test_nll_is_non_increasing_in_k(models, val, which):
    results = {k: nll(models[which], val, k=k, n=40, seed=1) for k in (1, 10, 100)}
    means = {k: r.mean() for k, r in results.items()}
    se = {k: r.std(ddof=1) / np.sqrt(len(r)) for k, r in results.items()}
    print(which, {k: round(float(m), 2) for k, m in means.items()})
    for small, big in ((1, 10), (10, 100)):
        assert means[big] <= means[small] + 0.1 * (se[small] + se[big]), means
    assert means[100] < means[1] - 0.3, means  # the bound really tightens


def test_a_decoder_that_ignores_y_fails_the_checks(models, val, mnist, monkeypatch):
    """Conditioning silently dropped (a decoder that takes y and never uses it: it learns P(X|z)
    while the encoder still sees y; everything else trains as before) fails both checks above."""
    from kvae import model

    monkeypatch.setattr(model, "build_decoder_net", decoder_ignoring_y)
    dropped = train(mnist, True)
    assert dropped.num_classes == mnist.num_classes
    given_y, plain = nll(dropped, val), nll(models["unconditional"], val)
    print(f"decoder ignoring y: -log P(X|y) {given_y.mean():.2f} vs -log P(X) {plain.mean():.2f}")
    with pytest.raises(AssertionError, match="label gap"):
        check_label_helps(given_y, plain)
    with pytest.raises(AssertionError, match="change by 0.0000"):
        check_decoder_uses_y(dropped, mnist.num_classes)


# ----------------------------------------------------------------------------------------------
# 6. The CLI


def test_fit_and_evaluate_cli_conditional(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    fit = subprocess.run([sys.executable, "-m", "kvae.fit", "--conditional", "--arch", "mlp",
                          "--epochs", "1", "--latent-dim", "2", "--hidden", "16", "--batch-size",
                          "256", "--kl-warmup", "0", "--eval-k", "5", "--out", str(run)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "conditional on 10 classes" in fit.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == [str(i) for i in range(10)]
    assert metrics["eval"]["conditional"] is True and metrics["eval"]["nll_of"] == "-log P(X|y)"
    with Image.open(run / "samples.png") as im:
        width, height = im.size
    tile = 2 * 28 + 2  # save_grid: 28-pixel images upscaled 2x, 2-pixel gaps
    assert ((height - 2) / tile, (width - 2) / tile) == (10, 8)  # one row per class, 8 samples each

    import keras

    decoder = keras.saving.load_model(run / "decoder.keras", safe_mode=True)
    assert [tuple(t.shape) for t in decoder.inputs] == [(None, 2), (None, 10)]

    ev = subprocess.run([sys.executable, "-m", "kvae.evaluate", str(run), "--k", "5", "--n", "20"],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "-log P(X|y) (IWAE)" in ev.stdout and "-log P(X) (IWAE)" not in ev.stdout, ev.stdout
    result = json.loads((run / "metrics.json").read_text())["eval"]
    assert (result["k"], result["n"], result["conditional"], result["nll_of"]) == (5, 20, True,
                                                                                   "-log P(X|y)")
    assert metrics["classes"] == json.loads((run / "metrics.json").read_text())["classes"]
    assert 50 < result["nll"] <= result["neg_elbo"] + 1e-6


@pytest.mark.slow
def test_fit_conditional_under_jax(tmp_path):
    """The JAX path: numpy batches ((x, y),) from train_batches and validation data ((x, y),)."""
    jax_python = Path(os.environ.get("KVAE_JAX_PYTHON") or ROOT / ".venv-jax" / "bin" / "python")
    if not jax_python.exists():  # as tests/test_jax.py: CI must have it, a laptop may not
        message = f"no JAX environment at {jax_python} (see requirements-jax.txt)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    run = tmp_path / "run"
    fit = subprocess.run([str(jax_python), "-m", "kvae.fit", "--conditional", "--arch", "mlp",
                          "--epochs", "1", "--latent-dim", "2", "--hidden", "16", "--batch-size",
                          "256", "--kl-warmup", "0", "--eval-k", "5", "--out", str(run)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
                              "PYTHONPATH": str(ROOT)})
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-3000:]
    assert "Keras backend jax" in fit.stdout and "conditional on 10 classes" in fit.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == [str(i) for i in range(10)] and metrics["eval"]["conditional"]
    assert 50 < metrics["eval"]["nll"] < 600  # one epoch: finite and learning

    from kvae.model import load_vae

    assert load_vae(run / "vae.keras").num_classes == 10  # loads under TensorFlow
