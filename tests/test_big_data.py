"""Big datasets: streamed image folders and TFDS splits, --cache, --image-size, the celeb_a preset."""

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

from kvae import data
from kvae.errors import KVAEError

CONFIGS = Path(__file__).parent.parent / "configs"


def image_folder(path: Path, n: int = 40, size=(6, 5), seed: int = 0) -> np.ndarray:
    """n random greyscale PNGs 000.png .. in `path`; returns them (n, H, W, 1) in name order."""
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).integers(0, 256, (n, *size), dtype=np.uint8)
    for i, image in enumerate(x):
        Image.fromarray(image).save(path / f"{i:03d}.png")
    return x[..., None]


def batches(x, start=0, stop=3, cache="none", binarize="dynamic", batch_size=8):
    ds, steps = data.train_dataset(x, batch_size, binarize, seed=3, initial_epoch=start, epochs=stop,
                                   cache=cache)
    out = [b.numpy() for b in ds]
    assert len(out) == steps * (stop - start)
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


@contextlib.contextmanager
def mock_tfds(n: int):
    """tfds.testing.mock_data with `n` fixed random examples per split that honours TFDS slicing
    (`train[a:b]`), as real TFDS does: the stock mock returns every example for any slice."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
        features = builder.info.features
        rng = np.random.default_rng(len(split.split("[")[0]))  # train and test differ
        examples = {"image": rng.integers(0, 256, (n, *features["image"].shape), dtype=np.uint8)}
        if "label" in features:
            examples["label"] = rng.integers(0, features["label"].num_classes, n)
        if "[" in split:
            a, b = split.split("[")[1].rstrip("]").split(":")
            part = slice(int(a) if a else None, int(b) if b else None)
            examples = {k: v[part] for k, v in examples.items()}
        return tf.data.Dataset.from_tensor_slices(examples)

    with tfds.testing.mock_data(num_examples=n, as_dataset_fn=as_dataset):
        yield


def test_streamed_folder_holds_and_trains_on_the_images_an_npz_of_them_gives(tmp_path):
    x = image_folder(tmp_path / "imgs")
    np.savez(tmp_path / "d.npz", x=x[..., 0])  # the same images, in file-name order
    folder, array = data.load(str(tmp_path / "imgs"), val_size=8), data.load(str(tmp_path / "d.npz"), val_size=8)
    s = folder.x_train
    assert isinstance(s, data.Stream) and isinstance(folder.x_val, np.ndarray)
    assert len(s) == 32 and s.shape == (32, 6, 5, 1) and folder.image_shape == (6, 5, 1)
    np.testing.assert_array_equal(s[:], array.x_train)  # the same fixed held-out split
    np.testing.assert_array_equal(folder.x_val, array.x_val)
    np.testing.assert_array_equal(s[-1], array.x_train[-1])
    np.testing.assert_array_equal(s[2:5, ..., 0], array.x_train[2:5, ..., 0])
    np.testing.assert_array_equal(np.asarray(s), array.x_train)
    assert s[4:2].shape == (0, 6, 5, 1)
    # one shuffle window holds all 32: exactly the batches of the in-memory array, every epoch
    assert_same(batches(s), batches(array.x_train))
    # the numpy pipeline of backends without tf.data (jax) reads a Stream into memory
    stream_np, _ = data.train_batches(s, 8, "dynamic", 3, 0, 2)
    array_np, _ = data.train_batches(array.x_train, 8, "dynamic", 3, 0, 2)
    assert_same([b[0] for b in stream_np], [b[0] for b in array_np])


def test_cache_gives_the_same_batches_decodes_once_and_resumes(tmp_path, monkeypatch):
    image_folder(tmp_path / "imgs", n=50)
    s = data.load(str(tmp_path / "imgs"), val_size=5).x_train
    monkeypatch.setattr(data, "SHUFFLE_BYTES", 12 * 30)  # windows of 12 images: 4 windows of 45
    decoded = []
    read = data._read_image
    monkeypatch.setattr(data, "_read_image", lambda *a: decoded.append(a[0]) or read(*a))

    plain = batches(s, 0, 3)
    assert len(decoded) == 3 * 45  # no cache: every epoch decodes every training image
    decoded.clear()
    assert_same(batches(s, 0, 3, cache="memory"), plain)
    assert len(decoded) == 45  # decoded once, epochs 1 and 2 read memory
    decoded.clear()
    prefix = tmp_path / "cache" / "imgs"
    assert_same(batches(s, 0, 3, cache=str(prefix)), plain)
    assert len(decoded) == 45 and (tmp_path / "cache" / f"imgs.{s.key}.index").exists()
    decoded.clear()
    assert_same(batches(s, 2, 3, cache=str(prefix)), plain[10:])  # resumed: epoch 2, from the files
    assert decoded == []
    assert_same(batches(s, 1, 3), plain[5:])  # resumed without a cache: the same batches

    epochs = [np.concatenate(plain[i:i + 5]) for i in (0, 5)]
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch reshuffles
    whole = batches(s, 0, 1, binarize="none", batch_size=45)[0]  # one epoch, one batch: every image
    pixels = np.round(whole * 255).astype(np.uint8)
    assert sorted(bytes(b) for b in pixels) == sorted(bytes(a) for a in s[:])  # each image once


def test_half_written_cache_fails_in_one_line(tmp_path):
    image_folder(tmp_path / "imgs", n=10)
    s = data.load(str(tmp_path / "imgs"), val_size=2).x_train
    (tmp_path / f"c.{s.key}_0.lockfile").write_text("")  # as a run killed while writing leaves it
    with pytest.raises(KVAEError, match="another run is writing this cache, or one was stopped"):
        data.train_dataset(s, 4, "dynamic", 0, 0, 1, cache=str(tmp_path / "c"))


def test_image_size_center_crops_and_resizes(tmp_path):
    x = np.zeros((6, 10, 6), np.uint8)  # (N, H, W): tall images, a 6 x 6 centre framed by 255s
    x[:, :2], x[:, -2:] = 255, 255
    x[:, 2:8] = np.random.default_rng(0).integers(0, 200, (6, 6, 6))
    np.savez(tmp_path / "d.npz", x=x)
    d = data.load(str(tmp_path / "d.npz"), val_size=2, image_size=6)
    assert d.image_shape == (6, 6, 1)
    np.testing.assert_array_equal(np.sort(np.concatenate([d.x_train, d.x_val]), axis=0),
                                  np.sort(x[:, 2:8, :, None], axis=0))  # the centre, unchanged
    small = data.load(str(tmp_path / "d.npz"), val_size=2, image_size=3)
    assert small.x_train.shape == (4, 3, 3, 1) and small.x_train.dtype == np.uint8
    assert abs(np.concatenate([small.x_train, small.x_val]).mean() - x[:, 2:8].mean()) < 2

    from PIL import Image

    mixed = tmp_path / "mixed"  # different sizes fail without --image-size, stream with it
    mixed.mkdir()
    for i, size in enumerate([(20, 30), (30, 20), (16, 16), (40, 25)]):
        Image.new("RGB", size, (i * 40, 10, 200)).save(mixed / f"{i}.png")
    with pytest.raises(KVAEError, match="different sizes .* or pass --image-size N"):
        data.load(str(mixed), val_size=1)
    d = data.load(str(mixed), val_size=1, image_size=8)
    assert d.x_train.shape == (3, 8, 8, 3) and d.x_val.shape == (1, 8, 8, 3)
    colours = {tuple(im[4, 4]) for im in np.concatenate([d.x_train[:], d.x_val])}
    assert colours == {(i * 40, 10, 200) for i in range(4)}  # plain colours survive the resize
    assert data.load("mnist-5k", image_size=14).x_train.shape == (4500, 14, 14, 1)


def test_celeb_a_preset_streams_under_mock_data(tmp_path, monkeypatch):
    from kvae.config import Config

    config = Config.from_json(CONFIGS / "celeb_a.json")
    assert (config.dataset, config.image_size, config.likelihood) == ("celeb_a", 64, "gaussian")
    with mock_tfds(30):
        kwargs = dict(data_dir=str(tmp_path), val_size=6, image_size=config.image_size)
        small = data.load(config.dataset, **kwargs)  # 30 images fit in memory: numpy
        monkeypatch.setattr(data, "STREAM_BYTES", 0)  # as the 162,770 real ones do not
        big = data.load(config.dataset, **kwargs)
        test = data.load(config.dataset, split="test", **kwargs)
        s = big.x_train
        assert isinstance(small.x_train, np.ndarray) and isinstance(s, data.Stream)
        assert s.shape == (24, 64, 64, 3) and big.x_val.shape == (6, 64, 64, 3)
        np.testing.assert_array_equal(s[:], small.x_train)  # the same split either way
        np.testing.assert_array_equal(big.x_val, small.x_val)
        assert test.x_val.shape == (30, 64, 64, 3)
        assert not np.array_equal(test.x_val[:6], big.x_val)
        got = batches(s, 0, 2, binarize=config.resolved_binarize, cache="memory")
        assert_same(got, batches(small.x_train, 0, 2, binarize="none"))
        assert got[0].shape == (8, 64, 64, 3) and 0 <= got[0].min() and got[0].max() <= 1


def test_big_tfds_with_labels_streams(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "STREAM_BYTES", 0)
    with mock_tfds(40):
        d = data.load("mnist", data_dir=str(tmp_path), val_size=10)
    assert isinstance(d.x_train, data.Stream) and len(d.x_train) == 30
    assert d.x_val.shape == (10, 28, 28, 1) and d.y_val.shape == (10,) and d.y_train is None


def _corrupt_a_training_image(folder: Path, val_size: int) -> Path:
    """Truncates one image of the training split: its header still reads, its pixels do not."""
    files = sorted(folder.glob("*.png"))
    order = np.random.default_rng(data.SPLIT_SEED).permutation(len(files))
    bad = files[order[-1]]  # read last in file order; the error must still reach the user
    bad.write_bytes(bad.read_bytes()[:60])
    return bad


def test_broken_image_found_while_training_is_one_line(tmp_path, capsys):
    from kvae import fit

    image_folder(tmp_path / "imgs", n=24, size=(8, 8))
    bad = _corrupt_a_training_image(tmp_path / "imgs", val_size=4)
    d = data.load(str(tmp_path / "imgs"), val_size=4)  # the header check passes
    with pytest.raises(KVAEError, match=f"cannot read image {bad}: .*remove it from the folder"):
        d.x_train[:]
    with pytest.raises(SystemExit) as e:
        fit.main(["--dataset", str(tmp_path / "imgs"), "--val-size", "4", "--epochs", "1",
                  "--batch-size", "4", "--latent-dim", "2", "--hidden", "8", "--filters", "2",
                  "--eval-k", "0", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kvae.fit: error: cannot read image {bad}"), err


def test_fit_trains_on_a_streamed_folder_with_a_cache(tmp_path):
    from kvae.config import Config
    from kvae.fit import fit

    image_folder(tmp_path / "imgs", n=48, size=(8, 8))
    out = tmp_path / "run"
    metrics = fit(Config(dataset=str(tmp_path / "imgs"), val_size=8, epochs=1, batch_size=8,
                         latent_dim=2, hidden=8, filters=2, eval_k=0, cache=str(tmp_path / "c" / "x"),
                         image_size=4, out=str(out)))
    assert metrics["n_train"] == 40 and metrics["n_val"] == 8 and np.isfinite(metrics["best_val_loss"])
    assert json.loads((out / "config.json").read_text())["cache"] == str(tmp_path / "c" / "x")
    assert list((tmp_path / "c").glob("x.*.index"))  # the cache was written in full


def test_config_checks_the_new_fields():
    from kvae.config import Config, ConfigError

    with pytest.raises(ConfigError, match="--image-size must be a positive integer"):
        Config(image_size=0)
    with pytest.raises(ConfigError, match="--cache must be none, memory or a path prefix"):
        Config(cache=" ")
