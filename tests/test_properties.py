"""Property-based tests (hypothesis) of the TensorFlow-free runtime on the exported conv test run.

- Input validation: whatever is passed to `decode`, `encode`, `sample`, `log_likelihood` or
  `interpolate` (any dtype, shape, ragged lists, strings, NaN/inf, huge or negative numbers), the
  runtime either returns a correct float32 result or raises the documented `RuntimeInputError`
  with a one-line message; never another exception.
- Float32 parity: for z drawn from wide ranges (|z| up to 10, far beyond N(0, I)) and odd batch
  sizes (1 to 301, past the chunk size), ONNX and TFLite decoders match Keras within the
  contract's 1e-5; the same for the encoders on arbitrary [0, 1] images.

Examples are derandomized (the same every run, so CI is reproducible); no example database.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FORMATS = ["onnx", "tflite"]
PARITY = 1e-5  # max abs diff against Keras, float32 (the export contract)
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


# ----------------------------------------------------------------------------------------------
# Strategies: anything a caller might pass


DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, np.uint64, np.bool_,
          np.complex64, np.dtype("U3"), np.dtype("M8[s]")]
NEAR = st.sampled_from([(LATENT,), (1, LATENT), (3, LATENT), (0, LATENT), (2, LATENT - 1), (2, LATENT, 1),
                        IMAGE, (2, *IMAGE), (2, 28, 28), (28, 28), (1, 28, 28, 3), (0, *IMAGE), (),
                        (784,), (1, 784)])


def any_array(shapes=NEAR, right=None):
    """Arrays of any dtype, with shapes that are right, nearly right or wrong; `right` (shapes that
    are right) adds arrays of those shapes holding any float32 or integer value."""
    options = [
        st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(dtype, shapes)),
        hnp.arrays(np.float64, shapes, elements=st.floats(allow_nan=True, allow_infinity=True)),
        hnp.arrays(np.int64, shapes, elements=st.integers(-2**63, 2**63 - 1)),
        hnp.arrays(np.float32, shapes, elements=st.floats(0, 1, width=32)),
    ]
    if right is not None:
        options += [hnp.arrays(np.float32, right, elements=st.floats(width=32)),  # up to +-3.4e38
                    hnp.arrays(np.float32, right, elements=st.floats(0, 1, width=32)),
                    hnp.arrays(np.uint8, right)]
    return st.one_of(*options)


def anything():
    """Python values that are not arrays: scalars, strings, None, nested and ragged lists."""
    scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3),
                       st.complex_numbers(max_magnitude=10))
    return st.recursive(scalar, lambda inner: st.lists(inner, max_size=4), max_leaves=12)


def check_result(call, check):
    """Runs call(); a result must pass check(result), an error must be the documented one."""
    from kvae.runtime import RuntimeInputError

    try:
        result = call()
    except RuntimeInputError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        event(f"refused: {message.split(':')[0].split(' (')[0][:40]}")
        return None
    check(result)
    event("accepted")
    return result


def valid_images(x_mean, shape):
    assert isinstance(x_mean, np.ndarray) and x_mean.dtype == np.float32
    assert x_mean.shape == shape
    assert np.all((x_mean >= 0) & (x_mean <= 1)), "x_mean outside [0, 1] (or NaN)"


# ----------------------------------------------------------------------------------------------
# Input validation


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=150, **SETTINGS)
@given(z=st.one_of(any_array(right=st.sampled_from([(LATENT,), (1, LATENT), (5, LATENT)])), anything()))
def test_decode_takes_anything_or_says_why(vaes, fmt, z):
    def check(x_mean):
        n = np.shape(z)[0] if np.ndim(z) == 2 else None
        valid_images(x_mean, (n, *IMAGE) if n is not None else IMAGE)

    check_result(lambda: vaes[fmt].decode(z), check)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=150, **SETTINGS)
@given(x=st.one_of(any_array(right=st.sampled_from([IMAGE, (3, *IMAGE), (3, 28, 28)])), anything()))
def test_encode_takes_anything_or_says_why(vaes, fmt, x):
    def check(result):
        loc, scale = result
        assert loc.dtype == scale.dtype == np.float32 and loc.shape == scale.shape
        assert loc.shape[-1] == LATENT and np.all(np.isfinite(loc)) and np.all(scale > 0)

    check_result(lambda: vaes[fmt].encode(x), check)


@settings(max_examples=100, **SETTINGS)
@given(n=st.one_of(st.integers(-3, 5), anything()), seed=st.one_of(st.integers(-3, 2**70), anything()))
def test_sample_takes_anything_or_says_why(vaes, n, seed):
    check_result(lambda: vaes["onnx"].sample(n, seed=seed),
                 lambda x: valid_images(x, (int(n), *IMAGE)))


@settings(max_examples=60, **SETTINGS)
@given(x=st.one_of(any_array(st.sampled_from([(2, 28, 28), (3, 3)]), right=st.sampled_from([IMAGE, (2, *IMAGE)])),
                   anything()),
       k=st.one_of(st.integers(1, 3), st.integers(-2, 3), anything()),
       seed=st.one_of(st.integers(0, 2**64), st.integers(-2, 5), anything()))
def test_log_likelihood_takes_anything_or_says_why(vaes, x, k, seed):
    def check(log_px):
        assert np.all(np.asarray(log_px) <= 0) and np.all(np.isfinite(log_px))

    check_result(lambda: vaes["onnx"].log_likelihood(x, k=k, seed=seed), check)


@settings(max_examples=40, **SETTINGS)
@given(steps=st.one_of(st.integers(-2, 6), anything()),
       pair=st.sampled_from(["one", "batch", "mismatch", "wrong"]))
def test_interpolate_takes_anything_or_says_why(vaes, steps, pair):
    a = {"one": np.zeros(IMAGE), "batch": np.zeros((2, *IMAGE)), "mismatch": np.zeros(IMAGE),
         "wrong": np.zeros((5, 5))}[pair]
    b = np.ones((2, *IMAGE)) if pair in ("batch", "mismatch") else np.ones(IMAGE)

    def check(path):
        assert path.shape[-3:] == IMAGE and np.all((path >= 0) & (path <= 1))

    check_result(lambda: vaes["onnx"].interpolate(a, b, steps=steps), check)


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
