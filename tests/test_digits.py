"""The digit classifier that judges samples (bench/digits.py) and the conditional-sampling
benchmark built on it (bench/conditional.py), checked against stand-in decoders whose answer is
known: one that draws real digits of the class it is given (share ~100%) and one that ignores
its class input (share ~10%)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bench_scripts import load_script

BENCH = Path(__file__).resolve().parents[1] / "bench"
DIGITS = [str(d) for d in range(10)]


conditional = load_script("conditional")
digits = conditional.digits  # the module conditional.py uses: one set of caches and classes


@pytest.fixture(scope="module")
def judge():
    """(classifier, Digits, cache folder): the benchmarks' own classifier, from their cache in
    runs/ (trained there on the first run, ~25 s on 2 cores; the cache key names the digits,
    labels, settings, model code and Keras version, so any change trains it again)."""
    real = digits.load_digits()
    model = digits.train_classifier(real.x_train, real.y_train, seed=0, cache_dir=digits.CACHE)
    return model, real, digits.CACHE


# ---------------------------------------------------------------- the classifier
def test_classifier_accuracy_on_held_out_digits(judge):
    model, real, _ = judge
    assert real.x_train.shape == (4500, 28, 28, 1) and real.x_val.shape == (500, 28, 28, 1)
    assert real.x_train is real.x_vae_train  # the default source: the VAE's training digits
    # measured 0.978, 0.980, 0.984, 0.982 (seeds 0 to 3); 0.95 leaves 4 standard errors of 500
    assert digits.accuracy(model, real.x_val, real.y_val) >= 0.95
    assert 0 < digits.training_record(model)["train_seconds"] < 600  # measured 20-35 s


def test_trained_classifier_is_cached_and_reused(judge):
    model, real, cache = judge
    again = digits.train_classifier(real.x_train, real.y_train, seed=0, cache_dir=cache)
    path = digits.cache_path(real.x_train, real.y_train, 0, cache)
    assert again is not model and path.is_file()
    assert digits.training_record(again) == {
        "train_seconds": digits.training_record(model)["train_seconds"],
        "cached": str(path.relative_to(digits.ROOT))}
    np.testing.assert_allclose(digits.predict(again, real.x_val[:50]),
                               digits.predict(model, real.x_val[:50]), atol=1e-6)
    # the key names the digits, labels and seed
    assert digits.cache_path(real.x_train, real.y_train, 1, cache) != path
    assert digits.cache_path(real.x_train[1:], real.y_train[1:], 0, cache) != path
    assert digits.cache_path(real.x_train, np.roll(real.y_train, 1), 0, cache) != path


def test_damaged_cache_file_is_trained_again(tmp_path):
    x = np.zeros((8, 28, 28, 1), np.float32)
    y = np.arange(8)
    settings = {**digits.SETTINGS, "epochs": 1}
    path = digits.cache_path(x, y, 0, tmp_path, settings)
    path.write_bytes(b"not a zip")
    first = digits.train_classifier(x, y, 0, tmp_path, settings)  # unreadable: trains
    assert digits.training_record(first)["cached"] is None
    second = digits.train_classifier(x, y, 0, tmp_path, settings)  # the file written over it
    assert digits.training_record(second)["cached"] == str(path)


# ---------------------------------------------------------------- the measures
def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 5))
    assert digits.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert digits.frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-9)
    # scaled copy: same mean, S_b = 4 S_a -> tr(S_a + 4 S_a - 2 * 2 S_a) = tr(S_a)
    centered = a - a.mean(0)
    assert digits.frechet_distance(centered, 2 * centered) == pytest.approx(
        np.trace(np.cov(a, rowvar=False)), rel=1e-9)
    # against scipy's matrix square root on unrelated covariances
    from scipy import linalg

    b = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5)) + 1.0
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu = a.mean(0) - b.mean(0)
    expected = mu @ mu + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real)
    assert digits.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_summarize_probs_by_hand():
    probs = np.full((4, 10), 0.01)
    probs[[0, 1, 2, 3], [3, 3, 5, 7]] = [0.91, 0.5, 0.95, 0.2]
    result = digits.summarize_probs(probs)
    assert result["class_histogram"] == [0, 0, 0, 2, 0, 1, 0, 1, 0, 0]
    assert result["confident_share"] == 0.5 and result["n"] == 4
    assert result["mean_max_prob"] == pytest.approx((0.91 + 0.5 + 0.95 + 0.2) / 4)
    assert result["class_entropy_bits"] == pytest.approx(1.5)  # (1/2, 1/4, 1/4)
    assert digits.summarize_probs(probs[:2])["class_entropy_bits"] == 0.0  # one class only


def test_real_digits_score_better_than_blur_and_noise(judge):
    model, real, _ = judge
    n = 500
    pick = np.random.default_rng(1).choice(len(real.x_vae_train), n, replace=False)
    train = real.x_vae_train[pick]
    noise = np.random.default_rng(2).random((n, 28, 28, 1), dtype=np.float32)
    q = {name: digits.sample_quality(model, x, real.x_val, real.x_vae_train)
         for name, x in (("real", train), ("blurred", digits.blurred(train)), ("noise", noise))}
    # measured: real 7.3 (floor 7.5), blurred 130, noise 310; confident 0.96 / 0.54 / 0.46
    assert q["real"]["frechet"] < 2 * q["real"]["frechet_floor"]
    assert 3 * q["real"]["frechet"] < q["blurred"]["frechet"] < q["noise"]["frechet"]
    assert q["real"]["frechet_floor"] == q["noise"]["frechet_floor"]  # n real training digits
    assert q["real"]["confident_share"] > 0.9 > q["blurred"]["confident_share"]
    assert q["real"]["class_entropy_bits"] > 3.2  # nearly even over ten digits (3.32)
    assert q["noise"]["class_entropy_bits"] < 1.5  # noise looks like one or two digits at most
    assert sum(q["real"]["class_histogram"]) == n


# ---------------------------------------------------------------- the conditional benchmark
def stand_in(folder: Path, x: np.ndarray, y: np.ndarray, uses_y: bool, latent_dim: int = 8,
             per_class: int = 10) -> Path:
    """A run folder whose decoder.keras maps (z, y) to one of `per_class` real digits: of class
    argmax(y) (uses_y), or of any class, whatever y says. z picks which, through a sharp softmax."""
    import keras

    layers = keras.layers
    bank = np.concatenate([x[y == c][:per_class] for c in range(10)]).reshape(-1, 784)  # (10K, 784)
    rng = np.random.default_rng(0)
    z_in, y_in = keras.Input((latent_dim,), name="z"), keras.Input((10,), name="y")
    if uses_y:
        pick = layers.Dense(per_class, activation="softmax", use_bias=False)
        which = layers.Multiply()([layers.Reshape((10, 1))(y_in),
                                   layers.Reshape((1, per_class))(pick(z_in))])
        which = layers.Flatten()(which)  # (B, 10K): one-hot at (class, pick)
        kernel = rng.standard_normal((latent_dim, per_class))
    else:
        pick = layers.Dense(10 * per_class, activation="softmax", use_bias=False)
        which = pick(z_in)
        kernel = rng.standard_normal((latent_dim, 10 * per_class))
    images = layers.Dense(784, use_bias=False)
    flat = images(which)
    if not uses_y:  # y connected, with no effect
        ignore = layers.Dense(784, use_bias=False, kernel_initializer="zeros")
        flat = layers.Add()([flat, ignore(y_in)])
    out = layers.Reshape((28, 28, 1), name="x_mean")(flat)
    decoder = keras.Model([z_in, y_in], out, name="decoder")
    pick.set_weights([100 * kernel / np.linalg.norm(kernel, axis=0)])  # unit columns: even odds
    images.set_weights([bank])
    folder.mkdir()
    decoder.save(folder / "decoder.keras")
    (folder / "config.json").write_text(json.dumps({"dataset": "mnist-5k", "conditional": True}))
    (folder / "metrics.json").write_text(json.dumps({"classes": DIGITS}))
    return folder


def test_stand_in_that_draws_the_asked_class_passes(judge, tmp_path):
    model, real, _ = judge
    run = stand_in(tmp_path / "run", real.x_train, real.y_train, uses_y=True)
    decoder, classes = conditional.open_run(run)
    result = json.loads(json.dumps(conditional.measure(decoder, classes, model, real, n=100)))
    # measured: 0.991 overall, every class 1.0 but 8 (0.91: one of its ten 8s looks like a 5)
    overall = result["overall"]
    assert overall["labelled_as_class"] >= 0.95 and result["goal"]["pass"]
    assert all(r["labelled_as_class"] >= 0.8 and r["n"] == 100 for r in result["per_class"])
    assert [r["class"] for r in result["per_class"]] == DIGITS
    assert overall["class_entropy_bits"] > 3.2 and overall["n"] == 1000
    assert overall["frechet_floor"] > 0 and overall["frechet"] > 0
    text = conditional.report(result)
    assert text.count("\n") == 12 and text.splitlines()[-1].startswith("PASS")


def test_stand_in_that_ignores_y_fails(judge, tmp_path):
    model, real, _ = judge
    run = stand_in(tmp_path / "run", real.x_train, real.y_train, uses_y=False)
    decoder, classes = conditional.open_run(run)
    result = conditional.measure(decoder, classes, model, real, n=100)
    # measured: 0.108 overall (0.06 to 0.15 a class); each class gets a mix of all ten digits
    assert 0.03 <= result["overall"]["labelled_as_class"] <= 0.2
    assert not result["goal"]["pass"]
    # they are digits (entropy 3.31 bits), just not the asked ones; the Frechet distance, which
    # sees all classes together, cannot tell this decoder from the one above (17.1 vs 15.6)
    assert result["overall"]["class_entropy_bits"] > 3.0
    assert conditional.report(result).splitlines()[-1].startswith("MISS")


def test_main_writes_results(judge, tmp_path, monkeypatch, capsys):
    model, real, _ = judge
    run = stand_in(tmp_path / "run", real.x_train, real.y_train, True)
    info = {"classifier_data": "mnist-5k", "note": "test", "val_accuracy": 0.98}
    monkeypatch.setattr(conditional.digits, "classifier", lambda *a, **k: (model, real, info))
    monkeypatch.setattr(conditional, "RESULTS", tmp_path / "results")
    conditional.main([str(run), "--n", "20", "--seed", "3"])
    assert "PASS" in capsys.readouterr().out
    result = json.loads((tmp_path / "results" / "conditional.json").read_text())
    assert result["command"] == f"python bench/conditional.py {run} --n 20 --seed 3"
    assert result["n"] == 20 and result["seed"] == 3 and result["run_config"]["conditional"] is True
    assert {"cpu", "cpus", "loadavg_1_5_15"} <= set(result["machine"])
    assert len(result["per_class"]) == 10 and result["classifier"] == info


@pytest.mark.parametrize("config, metrics, says", [
    ({"dataset": "mnist-5k"}, {}, "is an unconditional run"),
    ({"conditional": False}, {}, "is an unconditional run"),
    ({"conditional": True}, {"classes": ["tshirt", "trouser"]}, "not the digits 0..9"),
])
def test_wrong_runs_end_with_one_line(tmp_path, capsys, config, metrics, says):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "decoder.keras").write_bytes(b"never read")
    with pytest.raises(SystemExit) as e:
        conditional.main([str(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and says in err, err
    assert err.startswith("bench/conditional.py: error: ")


def test_missing_run_ends_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        conditional.main([str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "no such run folder" in err


# ---------------------------------------------------------------- --classifier-data mnist
def test_tfds_mnist_test_split_trains_the_classifier(monkeypatch):
    from kvae import data as kdata

    x_vae = digits._mnist_5k()[0]
    fake_test = np.concatenate([x_vae[:3], 1 - x_vae[:7]])  # 3 of them mnist-5k digits
    load = kdata.load

    def fake_load(name, data_dir=None, val_size=500, split="train", image_size=None):
        if name == "mnist":
            assert split == "test" and data_dir == "DIR"
            return kdata.Data("mnist", x_vae[:0], fake_test, None, np.arange(10))
        return load(name, data_dir, val_size, split, image_size)

    monkeypatch.setattr(digits.kdata, "load", fake_load)
    got = digits.load_digits("mnist", "DIR")
    assert got.source == "mnist" and got.x_train.shape == (10, 28, 28, 1) and got.overlap == 3
    assert got.x_train.dtype == np.float32 and got.x_train.max() <= 1.0
    np.testing.assert_array_equal(got.y_train, np.arange(10))
    assert len(got.x_val) == 500 and len(got.x_vae_train) == 4500  # judged as with mnist-5k
    assert "test split" in got.note


def test_tfds_mnist_unavailable_says_what_to_do(monkeypatch):
    from kvae.errors import KVAEError

    def offline(name, *args, **kwargs):
        if name == "mnist":
            raise KVAEError("TFDS dataset 'mnist' is not in ~/tensorflow_datasets and the network "
                            "is unreachable")
        return load(name, *args, **kwargs)

    load = digits.kdata.load
    monkeypatch.setattr(digits.kdata, "load", offline)
    with pytest.raises(KVAEError, match="offline, use --classifier-data mnist-5k"):
        digits.load_digits("mnist")
    with pytest.raises(KVAEError, match="unknown --classifier-data"):
        digits.load_digits("emnist")


def test_validation_digits_train_a_classifier_that_never_saw_the_vaes_digits():
    """--classifier-data mnist-5k-val: trained on the 500 digits the VAE never trains on, judged
    on the VAE's 4,500 training digits; no digit is on both sides."""
    val = digits.load_digits("mnist-5k-val")
    five_k = digits.load_digits("mnist-5k")
    assert len(val.x_train) == 500 and len(val.x_val) == 4500 and val.overlap == 0
    assert np.array_equal(val.x_train, five_k.x_val) and np.array_equal(val.x_val, five_k.x_train)
    assert not {digits._digest(im) for im in val.x_train} & {digits._digest(im) for im in val.x_val}
