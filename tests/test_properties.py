"""Property-based tests (hypothesis) of the TensorFlow-free runtime on the exported conv test run.

- Valid inputs must succeed: the documented inputs in any form a caller may pass them (any real
  dtype, python lists, one row or image or a batch of 0 to 5, uint8 or integer 0..255 pixels, n,
  k, steps and seeds as python or numpy integers) make `decode`, `encode`, `sample`,
  `log_likelihood` and `interpolate` return float32 results of the documented shape and range
  that equal what the model file gives when fed directly (conftest's `direct`: no kvae code).
- Invalid inputs must be refused: wrong shapes, NaN or inf, values too large for float32, pixels
  outside [0, 1] or 0..255, non-real dtypes, ragged or non-numeric lists, strings, None, bad n, k,
  steps or seeds raise `RuntimeInputError` with a one-line message; never a result, never another
  exception. A runtime that refused everything, or accepted everything, fails.
- Float32 parity: for z drawn from wide ranges (|z| up to 10, far beyond N(0, I)) and odd batch
  sizes (1 to 301, past the chunk size), ONNX and TFLite decoders match Keras within the
  contract's 1e-5; the same for the encoders on arbitrary [0, 1] images.

Examples are derandomized (the same every run, so CI is reproducible); no example database.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FORMATS = ["onnx", "tflite"]
PARITY = 1e-5  # max abs diff against Keras, float32 (the export contract)
SAME_FILE = 1e-6  # the runtime against the file fed directly: only slicing and casts in between
LATENT, IMAGE = 8, (28, 28, 1)  # conftest's trained_run("conv")
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="session")
def exported(exported_run) -> Path:
    """The conv test run with every file exported (shared with the other test files)."""
    return exported_run("conv")


@pytest.fixture(scope="session")
def vaes(exported):
    from kvae.runtime import VAE

    return {fmt: VAE.from_folder(exported, format=fmt, max_batch=128) for fmt in FORMATS}


@pytest.fixture(scope="session")
def keras_halves(exported):
    import keras

    return tuple(keras.saving.load_model(exported / f"{half}.keras", safe_mode=True)
                 for half in ("encoder", "decoder"))


@pytest.fixture(scope="session")
def files(exported, direct):
    """The same files fed directly: files[fmt][half](rows) -> outputs, through the signature the
    runtime documents for a batch of up to 5 (ONNX: its one graph; TFLite decoder: `batch1` row by
    row; TFLite encoder: `batch1` for one row, else the dynamic `serving_default`)."""
    folder = exported / "export"

    def rows_of(fn, name, rows_at_once):
        def call(x):
            step = len(x) if rows_at_once else 1
            parts = [fn(**{name: np.ascontiguousarray(x[i:i + step])}) for i in range(0, len(x), step)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return call

    onnx = {half: rows_of(direct(folder / f"{half}.onnx"), name, True)
            for half, name in (("encoder", "x"), ("decoder", "z"))}
    tflite_encoder = {sig: rows_of(direct(folder / "encoder.tflite", sig), "x", True)
                      for sig in ("batch1", "serving_default")}
    return {"onnx": onnx,
            "tflite": {"decoder": rows_of(direct(folder / "decoder.tflite", "batch1"), "z", False),
                       "encoder": lambda x: tflite_encoder["batch1" if len(x) == 1 else "serving_default"](x)}}


# ----------------------------------------------------------------------------------------------
# Strategies: valid inputs, in every form a caller may pass them


FLOATS = [np.float16, np.float32, np.float64]
INTEGERS = [np.int8, np.int16, np.int64, np.uint8, np.uint64]
REAL = FLOATS + INTEGERS + [np.bool_]
NOT_REAL = [np.complex64, np.dtype("U3"), np.dtype("M8[s]"), np.dtype(object)]


def elements(dtype, low: float, high: float):
    """Values of `dtype` within [low, high] (booleans: both)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return st.floats(low, high, width=8 * dtype.itemsize)
    if dtype.kind == "b":
        return st.booleans()
    info = np.iinfo(dtype)
    return st.integers(max(int(low), int(info.min)), min(int(high), int(info.max)))


def arrays_of(dtypes, shapes, low: float, high: float):
    return st.sampled_from(dtypes).flatmap(
        lambda dtype: hnp.arrays(dtype, shapes, elements=elements(dtype, low, high)))


def and_as_lists(arrays):
    """The arrays, and (if not empty) the same values as nested python lists."""
    return st.one_of(arrays, arrays.filter(lambda a: a.size > 0).map(lambda a: a.tolist()))


def valid_latents():
    """z the decoder must take: one (D,) row or (B, D) for B in 0..5, any real dtype, |z| <= 10."""
    shapes = st.one_of(st.just((LATENT,)), st.integers(0, 5).map(lambda b: (b, LATENT)))
    return and_as_lists(st.one_of(arrays_of(FLOATS, shapes, -10, 10), arrays_of(INTEGERS, shapes, -10, 10),
                                  hnp.arrays(np.bool_, shapes)))


def valid_images(batches=st.integers(0, 3)):
    """Images the encoder must take: (B, 28, 28, 1), (B, 28, 28), one (28, 28, 1) or (28, 28)
    image; floats in [0, 1], integers 0..255 or booleans."""
    shapes = st.one_of(st.sampled_from([IMAGE, IMAGE[:2]]), batches.map(lambda b: (b, *IMAGE)),
                       batches.map(lambda b: (b, *IMAGE[:2])))
    return and_as_lists(st.one_of(arrays_of(FLOATS, shapes, 0, 1), arrays_of(INTEGERS, shapes, 0, 255),
                                  hnp.arrays(np.bool_, shapes)))


def counts(low: int, high: int):
    """Integers in [low, high], as python ints or numpy int64."""
    return st.integers(low, high).flatmap(lambda n: st.sampled_from([n, np.int64(n)]))


SEEDS = st.one_of(st.integers(0, 2**70), st.integers(0, 2**63 - 1).map(np.uint64))


# Strategies: invalid inputs

WRONG_Z_SHAPES = [(), (0,), (LATENT - 1,), (LATENT + 1,), (2, LATENT - 1), (2, LATENT + 1),
                  (2, LATENT, 1), (1, 1, LATENT), (784,), IMAGE, (2, *IMAGE)]
WRONG_IMAGE_SHAPES = [(), (0,), (784,), (1, 784), (3, 3), (28, 27), (28, 28, 3), (28, 27, 1),
                      (2, 28, 28, 3), (2, 28, 27, 1), (2, 1, 28, 28), (2, 28, 28, 1, 1), (LATENT,)]


@st.composite
def spoiled(draw, arrays, values):
    """An array from `arrays` with one element replaced by one of `values`."""
    a = draw(arrays.filter(lambda a: a.size > 0)).copy()
    a.flat[draw(st.integers(0, a.size - 1))] = draw(values)
    return a


def not_arrays(right_size: int):
    """Values no runtime call can take as an array: None, strings, scalars, dicts, ragged or
    non-numeric lists."""
    row = [0.5] * right_size
    return st.one_of(
        st.none(), st.text(max_size=3), st.floats(), st.integers(), st.complex_numbers(max_magnitude=10),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
        st.sampled_from([[row, row[:-1]], [row, [row]], [None] * right_size, [row[:-1] + ["a"]],
                         [[None] * right_size], [row[:-1] + [1j]]]))


def not_real(dtype, shapes):
    """Arrays of complex numbers, strings, datetimes or python objects (None and ints)."""
    values = st.one_of(st.none(), st.integers(0, 3)) if dtype == np.dtype(object) else None
    return hnp.arrays(dtype, shapes, elements=values)


def invalid_latents():
    right = st.integers(1, 5).map(lambda b: (b, LATENT))
    return st.one_of(
        arrays_of(REAL, st.sampled_from(WRONG_Z_SHAPES), -1, 1),
        spoiled(arrays_of(FLOATS, right, -1, 1), st.sampled_from([np.nan, np.inf, -np.inf])),
        spoiled(hnp.arrays(np.float64, right, elements=st.floats(-1, 1)),
                st.sampled_from([1e39, -1e39, 1e300])),  # finite, but too large for float32
        st.sampled_from(NOT_REAL).flatmap(lambda dtype: not_real(dtype, right)),
        not_arrays(LATENT))


def invalid_images():
    right = st.integers(1, 3).map(lambda b: (b, *IMAGE))
    return st.one_of(
        arrays_of(REAL, st.sampled_from(WRONG_IMAGE_SHAPES), 0, 1),
        spoiled(arrays_of(FLOATS, right, 0, 1), st.sampled_from([np.nan, np.inf, -np.inf])),
        spoiled(arrays_of(FLOATS, right, 0, 1), st.one_of(st.floats(1.01, 6e4), st.floats(-6e4, -0.01))),
        spoiled(arrays_of([np.int16, np.int64], right, 0, 255),
                st.one_of(st.integers(256, 30000), st.integers(-30000, -1))),
        st.sampled_from(NOT_REAL).flatmap(lambda dtype: not_real(dtype, right)),
        not_arrays(28))


BAD_COUNTS = st.one_of(st.integers(max_value=-1), st.floats(allow_nan=True), st.booleans(), st.none(),
                       st.text(max_size=2), st.sampled_from([np.float64(2.0), 2.0, "3", [2]]))
BAD_SEEDS = st.one_of(st.integers(max_value=-1), st.floats(allow_nan=True), st.text(min_size=1, max_size=2),
                      st.complex_numbers(max_magnitude=10), st.sampled_from([np.float64(1.0), [-1]]))


# ----------------------------------------------------------------------------------------------
# Checks


def refused(call) -> str:
    """call() must raise RuntimeInputError with a one-line message (and nothing else)."""
    from kvae.runtime import RuntimeInputError

    with pytest.raises(RuntimeInputError) as error:
        call()
    message = str(error.value)
    assert message and "\n" not in message, repr(message)
    event(f"refused: {message.split(':')[0].split(' (')[0][:40]}")
    return message


def as_latents(z) -> tuple[np.ndarray, bool]:
    """z as the decoder documents it: float32 (B, D), and whether one row was given."""
    z = np.asarray(z)
    return z.astype(np.float32).reshape(-1, LATENT), z.ndim == 1


def as_images(x) -> tuple[np.ndarray, bool]:
    """Images as the encoder documents them: float32 (B, 28, 28, 1) in [0, 1], integers / 255."""
    x = np.asarray(x)
    single = x.shape in (IMAGE, IMAGE[:2])
    x = x.reshape(-1, *IMAGE)
    return (x.astype(np.float32) / 255 if x.dtype.kind in "iu" else x.astype(np.float32)), single


def images_in_unit_range(x_mean, shape):
    assert isinstance(x_mean, np.ndarray) and x_mean.dtype == np.float32
    assert x_mean.shape == shape
    assert np.all((x_mean >= 0) & (x_mean <= 1)), "x_mean outside [0, 1] (or NaN)"


def check_decoded(x_mean, z, files, fmt):
    rows, single = as_latents(z)
    images_in_unit_range(x_mean, IMAGE if single else (len(rows), *IMAGE))
    if len(rows):
        expected = files[fmt]["decoder"](rows)["x_mean"]
        assert np.abs(x_mean.reshape(expected.shape) - expected).max() <= SAME_FILE


# ----------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=100, **SETTINGS)
@given(z=valid_latents())
def test_decode_takes_every_valid_z(vaes, files, fmt, z):
    check_decoded(vaes[fmt].decode(z), z, files, fmt)
    event(f"accepted {type(z).__name__} {np.asarray(z).dtype}")


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=100, **SETTINGS)
@given(z=invalid_latents())
def test_decode_refuses_every_invalid_z(vaes, fmt, z):
    refused(lambda: vaes[fmt].decode(z))


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=40, **SETTINGS)
@given(z=hnp.arrays(np.float32, st.integers(1, 3).map(lambda b: (b, LATENT)),
                   elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_decode_of_extreme_z_is_right_or_says_the_model_overflowed(vaes, files, fmt, z):
    """|z| up to 3.4e38 (finite float32): either the file's own result, or the one documented
    refusal for a model whose output overflowed (never NaN out, never another error)."""
    from kvae.runtime import RuntimeInputError

    try:
        x_mean = vaes[fmt].decode(z)
    except RuntimeInputError as e:
        assert "NaN or infinite value(s) of x_mean" in str(e) and "\n" not in str(e), str(e)
        assert not np.all(np.isfinite(files[fmt]["decoder"](z)["x_mean"]))  # the file overflows too
        event("refused: the model overflowed")
        return
    check_decoded(x_mean, z, files, fmt)
    event("accepted")


# ----------------------------------------------------------------------------------------------
# encode


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=100, **SETTINGS)
@given(x=valid_images())
def test_encode_takes_every_valid_image(vaes, files, fmt, x):
    loc, scale = vaes[fmt].encode(x)
    rows, single = as_images(x)
    shape = (LATENT,) if single else (len(rows), LATENT)
    assert loc.dtype == scale.dtype == np.float32 and loc.shape == scale.shape == shape
    assert np.all(np.isfinite(loc)) and np.all(scale > 0) and np.all(np.isfinite(scale))
    if len(rows):
        expected = files[fmt]["encoder"](rows)
        assert np.abs(loc.reshape(-1, LATENT) - expected["loc"]).max() <= SAME_FILE
        assert np.abs(scale.reshape(-1, LATENT) - expected["scale"]).max() <= SAME_FILE
    event(f"accepted {type(x).__name__} {np.asarray(x).dtype}")


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=100, **SETTINGS)
@given(x=invalid_images())
def test_encode_refuses_every_invalid_image(vaes, fmt, x):
    refused(lambda: vaes[fmt].encode(x))


# ----------------------------------------------------------------------------------------------
# sample


@settings(max_examples=40, **SETTINGS)
@given(n=counts(0, 6), seed=st.one_of(st.none(), SEEDS, SEEDS.map(lambda s: ("generator", int(s)))))
def test_sample_takes_every_valid_n_and_seed(vaes, files, n, seed):
    """n images, equal to decoding eps ~ N(0, I) drawn by numpy's Generator from the same seed
    (prior="standard"; the fitted prior's draws are tests/test_prior.py's)."""
    given_seed = np.random.default_rng(seed[1]) if isinstance(seed, tuple) else seed
    images = vaes["onnx"].sample(n, seed=given_seed, prior="standard")
    images_in_unit_range(images, (int(n), *IMAGE))
    if seed is not None:
        same = seed[1] if isinstance(seed, tuple) else seed
        eps = np.random.default_rng(same).standard_normal((int(n), LATENT), dtype=np.float32)
        check_decoded(images, eps, files, "onnx")


@settings(max_examples=60, **SETTINGS)
@given(n_seed=st.one_of(st.tuples(BAD_COUNTS, st.one_of(st.none(), SEEDS)),  # a bad n, a good seed
                        st.tuples(counts(0, 3), BAD_SEEDS)))  # a good n, a bad seed
def test_sample_refuses_every_invalid_n_or_seed(vaes, n_seed):
    n, seed = n_seed
    refused(lambda: vaes["onnx"].sample(n, seed=seed))


# ----------------------------------------------------------------------------------------------
# log_likelihood


@settings(max_examples=40, **SETTINGS)
@given(x=valid_images(st.integers(0, 2)), k=counts(1, 3), seed=SEEDS)
def test_log_likelihood_takes_every_valid_input(vaes, x, k, seed):
    """Finite per-image estimates, equal to the call on the canonical float32 (B, 28, 28, 1) images."""
    log_px = vaes["onnx"].log_likelihood(x, k=k, seed=seed)
    rows, single = as_images(x)
    if single:
        assert isinstance(log_px, float) and np.isfinite(log_px)
    else:
        assert isinstance(log_px, np.ndarray) and log_px.dtype == np.float64 and log_px.shape == (len(rows),)
        assert np.all(np.isfinite(log_px))
    expected = vaes["onnx"].log_likelihood(rows, k=int(k), seed=int(seed))
    np.testing.assert_array_equal(np.reshape(log_px, -1), expected)


@settings(max_examples=60, **SETTINGS)
@given(x=invalid_images(), k=st.one_of(BAD_COUNTS, st.just(0)), seed=BAD_SEEDS,
       bad=st.sampled_from(["x", "k", "seed"]))
@example(x=None, k=None, seed="\n", bad="seed")  # found by CI: numpy's message quoted the newline
def test_log_likelihood_refuses_every_invalid_input(vaes, x, k, seed, bad):
    valid = {"x": np.zeros((1, *IMAGE), np.float32), "k": 2, "seed": 0}
    args = {**valid, bad: {"x": x, "k": k, "seed": seed}[bad]}
    refused(lambda: vaes["onnx"].log_likelihood(args["x"], k=args["k"], seed=args["seed"]))


# ----------------------------------------------------------------------------------------------
# interpolate


@settings(max_examples=25, **SETTINGS)
@given(steps=counts(2, 6), data=st.data(), batch=st.sampled_from([None, 1, 2]))
def test_interpolate_takes_every_valid_pair(vaes, steps, data, batch):
    shape = IMAGE if batch is None else (batch, *IMAGE)
    a, b = (data.draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 1, width=32))) for _ in "ab")
    vae = vaes["onnx"]
    path = vae.interpolate(a, b, steps=steps)
    expected_shape = (int(steps), *IMAGE) if batch is None else (batch, int(steps), *IMAGE)
    images_in_unit_range(path, expected_shape)
    ends = path if batch is None else path.transpose(1, 0, 2, 3, 4)  # (steps, [B,] H, W, C)
    np.testing.assert_allclose(ends[0], vae.decode(vae.encode(a)[0]), atol=SAME_FILE)
    np.testing.assert_allclose(ends[-1], vae.decode(vae.encode(b)[0]), atol=SAME_FILE)


@settings(max_examples=30, **SETTINGS)
@given(steps=st.one_of(BAD_COUNTS, st.sampled_from([0, 1])),
       pair=st.sampled_from(["steps", "mismatch", "wrong"]))
def test_interpolate_refuses_every_invalid_pair(vaes, steps, pair):
    a = {"steps": np.zeros(IMAGE), "mismatch": np.zeros(IMAGE), "wrong": np.zeros((5, 5))}[pair]
    b = np.ones((2, *IMAGE)) if pair == "mismatch" else np.ones(IMAGE)
    refused(lambda: vaes["onnx"].interpolate(a, b, steps=steps if pair == "steps" else 3))


# ----------------------------------------------------------------------------------------------
# Float32 parity on wide z and odd batches


ODD_BATCH = st.integers(0, 150).map(lambda b: 2 * b + 1)  # 1, 3, ..., 301 (max_batch 128: chunked)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=25, **SETTINGS)
@given(data=st.data(), batch=ODD_BATCH, bound=st.sampled_from([1.0, 3.0, 10.0]))
def test_decoder_parity_for_wide_z_and_odd_batches(vaes, keras_halves, fmt, data, batch, bound):
    z = data.draw(hnp.arrays(np.float32, (batch, LATENT),
                             elements=st.floats(-bound, bound, width=32)), label="z")
    expected = np.asarray(keras_halves[1](z))
    actual = vaes[fmt].decode(z)
    assert actual.shape == expected.shape == (batch, *IMAGE)
    diff = float(np.abs(actual - expected).max())
    assert diff <= PARITY, f"max abs diff {diff:.2e} at batch {batch}, max |z| {np.abs(z).max():.2f}"


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=15, **SETTINGS)
@given(data=st.data(), batch=ODD_BATCH)
def test_encoder_parity_for_odd_batches(vaes, keras_halves, fmt, data, batch):
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    x = np.random.default_rng(seed).random((batch, *IMAGE), dtype=np.float32)  # any [0, 1] pixels
    loc, scale = vaes[fmt].encode(x)
    expected_loc, expected_scale = (np.asarray(t) for t in keras_halves[0](x))
    assert float(np.abs(loc - expected_loc).max()) <= PARITY
    assert float(np.abs(scale - expected_scale).max()) <= PARITY
