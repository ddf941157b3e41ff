"""The TensorFlow-free runtime (kvae.runtime, kvae.sample, kvae.encode) on exported files.

One trained run (conftest's `trained_run("conv")`) is exported once per session with the export
scripts; every test reads those files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kvae.errors import KVAEError
from kvae.runtime import VAE, Decoder, Encoder, RuntimeInputError

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["onnx", "tflite"]
PARITY = 1e-5  # float32 parity bound against Keras (TOOLCHAIN.md measured <= 6e-6 on logits)

# Makes `import tensorflow` (and Keras, TFP, tf2onnx) fail in a child process: put this folder's
# sitecustomize.py first on PYTHONPATH.
BLOCKER = textwrap.dedent("""
    import sys

    BLOCKED = ("tensorflow", "keras", "tf_keras", "tensorflow_probability", "tf2onnx", "jax")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test (TensorFlow-free runtime)")
            return None

    sys.meta_path.insert(0, Blocker())
""")


@pytest.fixture(scope="session")
def run(exported_run) -> Path:
    """The conv run with every file exported by kvae.export (the export scripts' library), once.

    Same check as tests/test_export.py's fixture: whichever runs first exports, the other reuses.
    """
    return exported_run("conv")


@pytest.fixture(scope="session")
def keras_halves(run):
    import keras

    encoder = keras.saving.load_model(run / "encoder.keras", safe_mode=True)
    decoder = keras.saving.load_model(run / "decoder.keras", safe_mode=True)
    return encoder, decoder


@pytest.fixture(scope="session")
def images():
    from kvae.data import load, to_unit

    return to_unit(load("mnist-5k").x_val[:64])  # (64, 28, 28, 1) float32 in [0, 1]


@pytest.fixture(scope="session")
def blocker(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("no-tensorflow")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return folder


def run_without_tensorflow(blocker: Path, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Runs `python args...` with TensorFlow unimportable (the repo root stays importable)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          cwd=kwargs.pop("cwd", ROOT), timeout=120, **kwargs)


# --------------------------------------------------------------------------- no TensorFlow


def test_blocker_blocks_tensorflow(blocker):
    result = run_without_tensorflow(blocker, ["-c", "import tensorflow"])
    assert result.returncode != 0 and "blocked" in result.stderr


def test_import_runtime_imports_only_numpy(blocker):
    code = ("import sys, kvae, kvae.runtime, kvae.sample, kvae.encode; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'onnxruntime', 'ai_edge_litert', 'PIL') "
            "if m in sys.modules))")
    result = run_without_tensorflow(blocker, ["-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("fmt", FORMATS)
def test_samples_encodes_decodes_without_tensorflow(run, blocker, fmt, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from kvae.runtime import VAE

        vae = VAE.from_folder({str(run)!r}, format={fmt!r})
        x = vae.sample(5, seed=0)
        loc, scale = vae.encode(x)
        x_rec = vae.decode(loc)
        assert x.shape == x_rec.shape == (5, 28, 28, 1), (x.shape, x_rec.shape)
        assert loc.shape == scale.shape == (5, vae.latent_dim) and (scale > 0).all()
        assert np.isfinite(x_rec).all() and 0 <= x.min() and x.max() <= 1
        assert vae.log_likelihood((x > 0.5).astype(np.float32), k=4).shape == (5,)
        loaded = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")]
        assert not loaded, loaded
        print("ok", vae.encoder.format, vae.decoder.format)
    """)
    result = run_without_tensorflow(blocker, ["-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", fmt, fmt]


# --------------------------------------------------------------------------- parity with Keras


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch", [1, 64, 300])  # 300 > max_batch: chunked
def test_decoder_matches_keras(run, keras_halves, fmt, batch):
    _, keras_decoder = keras_halves
    decoder = Decoder(run / "export" / f"decoder.{fmt}", max_batch=128)
    z = np.random.default_rng(batch).standard_normal((batch, decoder.latent_dim), dtype=np.float32)
    expected = np.asarray(keras_decoder(z))
    actual = decoder.decode(z)
    assert actual.shape == expected.shape == (batch, 28, 28, 1)
    assert np.abs(actual - expected).max() <= PARITY


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch", [1, 64])
def test_encoder_matches_keras(run, keras_halves, images, fmt, batch):
    keras_encoder, _ = keras_halves
    encoder = Encoder(run / "export" / f"encoder.{fmt}")
    loc, scale = encoder.encode(images[:batch])
    expected_loc, expected_scale = (np.asarray(t) for t in keras_encoder(images[:batch]))
    assert loc.shape == (batch, encoder.latent_dim)
    assert np.abs(loc - expected_loc).max() <= PARITY
    assert np.abs(scale - expected_scale).max() <= PARITY


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_quantized_decoders_run(run, keras_halves, fmt, precision):
    """fp16 / int8 files open through the same API and stay within the exporter's own bounds."""
    from kvae.export import TOLERANCE

    vae = VAE.from_folder(run, format=fmt, precision=precision)
    assert vae.decoder.path.name == f"decoder.{precision}.{fmt}"
    assert vae.decoder.info["precision"] == precision
    z = np.random.default_rng(2).standard_normal((64, 8), dtype=np.float32)
    diff = np.abs(vae.decode(z) - np.asarray(keras_halves[1](z))).max()
    assert diff <= TOLERANCE[precision]["x_mean"], diff


def test_metadata_from_the_manifest(run):
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    decoder = Decoder(run)
    assert decoder.path == run / "export" / "decoder.onnx"  # a run folder opens ONNX first
    assert decoder.info["source"] == "manifest.json"
    assert decoder.latent_dim == manifest["latent_dim"] == 8
    assert list(decoder.image_shape) == manifest["image_shape"] == [28, 28, 1]
    assert decoder.info["likelihood"] == "bernoulli"


def test_single_vectors_and_uint8_images(run, images):
    vae = VAE.from_folder(run)
    assert vae.decode(np.zeros(vae.latent_dim)).shape == (28, 28, 1)  # float64 (D,) is fine
    loc, scale = vae.encode(images[0])
    assert loc.shape == scale.shape == (vae.latent_dim,)
    as_uint8 = (images[:4] * 255).round().astype(np.uint8)
    np.testing.assert_allclose(vae.encode(as_uint8)[0], vae.encode(images[:4])[0], atol=1e-5)
    np.testing.assert_allclose(vae.encode(images[:4, ..., 0])[0], vae.encode(images[:4])[0])
    assert vae.encode(images[:0])[0].shape == (0, vae.latent_dim)
    assert vae.sample(0).shape == (0, 28, 28, 1)


def test_reconstruct_and_interpolate(run, images):
    vae = VAE.from_folder(run)
    loc, _ = vae.encode(images[:3])
    np.testing.assert_array_equal(vae.reconstruct(images[:3]), vae.decode(loc))
    path = vae.interpolate(images[0], images[1], steps=5)
    assert path.shape == (5, 28, 28, 1)
    np.testing.assert_allclose(path[0], vae.decode(loc[0]), atol=1e-6)
    np.testing.assert_allclose(path[-1], vae.decode(loc[1]), atol=1e-6)
    batch = vae.interpolate(images[:2], images[1:3], steps=4)
    assert batch.shape == (2, 4, 28, 28, 1)
    np.testing.assert_allclose(batch[1, 0], path[-1], atol=1e-6)


def test_fixed_batch_file_is_fed_in_chunks(run, tmp_path):
    """A static-batch file (here: decoder.onnx with its batch fixed to 4) takes any batch size."""
    import onnx

    model = onnx.load(run / "export" / "decoder.onnx")
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 4
    del model.metadata_props[:]  # no manifest, no metadata: shapes only
    onnx.save(model, tmp_path / "decoder.onnx")
    fixed = Decoder(tmp_path / "decoder.onnx")
    assert fixed.session.fixed_batch == 4 and fixed.info["source"] == "model shapes"
    assert fixed.latent_dim == 8 and fixed.image_shape == (28, 28, 1)
    z = np.random.default_rng(0).standard_normal((10, 8), dtype=np.float32)
    np.testing.assert_allclose(fixed.decode(z), Decoder(run / "export" / "decoder.onnx").decode(z),
                               atol=1e-6)
    with pytest.raises(RuntimeInputError, match="likelihood"):  # no manifest: say which one
        VAE(run / "export" / "encoder.onnx", tmp_path / "decoder.onnx").log_likelihood(
            np.zeros((1, 28, 28, 1)))


def test_plan_uses_fixed_batch_signatures():
    """Which signature takes which rows: fixed `batch<N>` fast paths, the dynamic one, padding."""
    from kvae.runtime import _Session

    session = object.__new__(_Session)
    session.format, session.max_batch = "tflite", 100
    session._runners = {None: None, 1: None}
    session.prefer_fixed = True
    assert session.plan(3) == [(0, 1, 1), (1, 1, 1), (2, 1, 1)]
    session.prefer_fixed = False
    assert session.plan(1) == [(0, 1, 1)]  # exactly N rows: always the fixed signature
    assert session.plan(250) == [(0, 100, None), (100, 100, None), (200, 50, None)]
    session._runners = {8: None, 2: None}  # fixed batches only: largest first, the rest padded
    assert session.plan(19) == [(0, 8, 8), (8, 8, 8), (16, 2, 2), (18, 1, 2)]


@pytest.mark.parametrize("half", ["encoder", "decoder"])
def test_tflite_fixed_batch_signature_matches_dynamic(run, half):
    """The exporter's `batch1` signature (row by row) gives what serving_default gives."""
    cls = Decoder if half == "decoder" else Encoder
    fixed = cls(run / "export" / f"{half}.tflite", prefer_fixed=True)
    dynamic = cls(run / "export" / f"{half}.tflite", prefer_fixed=False)
    assert 1 in fixed.session.batches and None in fixed.session.batches
    rng = np.random.default_rng(0)
    if half == "decoder":
        z = rng.standard_normal((5, 8), dtype=np.float32)
        assert np.abs(fixed.decode(z) - dynamic.decode(z)).max() <= PARITY
    else:
        x = rng.random((5, 28, 28, 1), dtype=np.float32)
        for a, b in zip(fixed.encode(x), dynamic.encode(x)):
            assert np.abs(a - b).max() <= PARITY


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_from_the_file_without_a_manifest(run, tmp_path, fmt):
    import shutil

    shutil.copy(run / "export" / f"decoder.{fmt}", tmp_path / f"decoder.{fmt}")
    decoder = Decoder(tmp_path / f"decoder.{fmt}")
    assert decoder.info["source"] == ("ONNX metadata" if fmt == "onnx" else "TFLite metadata")
    assert (decoder.latent_dim, decoder.image_shape) == (8, (28, 28, 1))
    assert decoder.info["likelihood"] == "bernoulli"


def test_tflite_without_xnnpack_and_with_threads(run):
    z = np.random.default_rng(1).standard_normal((16, 8), dtype=np.float32)
    plain = Decoder(run / "export" / "decoder.tflite", xnnpack=False, threads=1).decode(z)
    fast = Decoder(run / "export" / "decoder.tflite", threads=2).decode(z)
    assert np.abs(plain - fast).max() <= PARITY


# --------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_across_processes(run, blocker):
    code = (f"from kvae.runtime import Decoder; import hashlib, sys; "
            f"x = Decoder({str(run)!r}).sample(16, seed=None if sys.argv[1] == 'none' else 7); "
            f"print(hashlib.sha256(x.tobytes()).hexdigest())")
    seeded = [run_without_tensorflow(blocker, ["-c", code, "7"]).stdout.strip() for _ in range(2)]
    unseeded = [run_without_tensorflow(blocker, ["-c", code, "none"]).stdout.strip() for _ in range(2)]
    assert len(seeded[0]) == 64 and seeded[0] == seeded[1]
    assert len(unseeded[0]) == 64 and unseeded[0] != unseeded[1]
    import hashlib

    here = Decoder(run).sample(16, seed=7)
    assert hashlib.sha256(here.tobytes()).hexdigest() == seeded[0]
    assert not np.array_equal(Decoder(run).sample(16, seed=8), here)


def test_sample_uses_standard_normal_eps(run):
    decoder = Decoder(run)
    eps = np.random.default_rng(3).standard_normal((4, 8), dtype=np.float32)
    np.testing.assert_array_equal(decoder.sample(4, seed=3), decoder.decode(eps))


# --------------------------------------------------------------------------- log-likelihood


@pytest.fixture(scope="session")
def iwae_reference(run):
    """100 held-out digits, binarized as kvae.evaluate does, and kvae.evaluate's IWAE NLL (k=100)."""
    from kvae.data import binarize_fixed, load
    from kvae.evaluate import iwae_nll
    from kvae.model import load_vae

    x = binarize_fixed(load("mnist-5k").x_val[:100], "dynamic")
    return x, iwae_nll(load_vae(run / "vae.keras"), x, k=100)["nll"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_log_likelihood_matches_kvae_evaluate(run, iwae_reference, fmt):
    x, expected = iwae_reference
    log_px = VAE.from_folder(run, format=fmt).log_likelihood(x, k=100, seed=1)
    assert log_px.shape == (100,) and np.all(log_px < 0)
    se = expected.std(ddof=1) / math.sqrt(len(x))  # over images, as kvae.evaluate reports it
    assert abs(-log_px.mean() - expected.mean()) < se, (-log_px.mean(), expected.mean(), se)
    # tighter: both are k=100 estimates of the same numbers on the same images, so their paired
    # difference has a small standard error (a wrong constant or clipping would show here)
    diff = -log_px - expected
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / math.sqrt(len(x)) + 1e-3, diff.mean()


def test_log_likelihood_is_seeded_and_chunked(run):
    vae = VAE.from_folder(run)
    x = (vae.sample(3, seed=0) > 0.5).astype(np.float32)
    whole = vae.log_likelihood(x, k=20, seed=5)
    np.testing.assert_allclose(vae.log_likelihood(x, k=20, seed=5, budget=784 * 7), whole, rtol=1e-9)
    assert isinstance(vae.log_likelihood(x[0], k=5), float)


# --------------------------------------------------------------------------- bad inputs


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert isinstance(error.value, ValueError) and isinstance(error.value, KVAEError)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("z, match", [
    (np.zeros((2, 7)), r"shape \(batch, 8\)"),
    (np.zeros((2, 8, 1)), r"shape \(batch, 8\)"),
    (np.array([[np.nan] * 8]), "NaN or infinite"),
    (np.array([[np.inf] + [0.0] * 7]), "NaN or infinite"),
    (np.full((1, 8), 1e300), "too large"),
    (np.array([["a"] * 8]), "real numeric"),
    (np.zeros((1, 8), np.complex64), "real numeric"),
])
def test_bad_latents(run, z, match):
    with pytest.raises(RuntimeInputError, match=match) as error:
        Decoder(run).decode(z)
    one_line(error)


@pytest.mark.parametrize("x, match", [
    (np.zeros((2, 28, 27, 1)), r"shape \(batch, 28, 28, 1\)"),
    (np.zeros((2, 28, 28, 3)), r"shape \(batch, 28, 28, 1\)"),
    (np.zeros((784,)), r"shape \(batch, 28, 28, 1\)"),
    (np.full((1, 28, 28, 1), np.nan), "NaN or infinite"),
    (np.full((1, 28, 28, 1), 255.0), r"in \[0, 1\]"),
    (np.full((1, 28, 28, 1), 300), "0..255"),
    (np.full((1, 28, 28, 1), "x"), "real numeric"),
])
def test_bad_images(run, x, match):
    with pytest.raises(RuntimeInputError, match=match) as error:
        Encoder(run).encode(x)
    one_line(error)


@pytest.mark.parametrize("call, match", [
    (lambda vae: vae.sample(-1), "non-negative"),
    (lambda vae: vae.sample(2, seed=-3), "seed"),
    (lambda vae: vae.interpolate(np.zeros((28, 28, 1)), np.zeros((2, 28, 28, 1))), "as many"),
    (lambda vae: vae.interpolate(np.zeros((28, 28, 1)), np.zeros((28, 28, 1)), steps=1), "steps"),
    (lambda vae: vae.log_likelihood(np.zeros((1, 28, 28, 1)), k=0), "k must"),
])
def test_bad_arguments(run, call, match):
    with pytest.raises(RuntimeInputError, match=match) as error:
        call(VAE.from_folder(run))
    one_line(error)


def damaged(run: Path, folder: Path, fmt: str, how: str) -> Path:
    """A copy of the decoder file: truncated, with bytes overwritten, empty, or not a model."""
    data = (run / "export" / f"decoder.{fmt}").read_bytes()
    path = folder / f"decoder.{fmt}"
    if how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "corrupt":
        path.write_bytes(data[:8] + bytes(range(256)) * 4 + data[8 + 1024:])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("this is a README, not a model\n")
    return path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how, match", [
    ("truncated", "cannot load|not a kvae"), ("corrupt", "cannot load|not a kvae"),
    ("empty", "empty"), ("text", "cannot load"),
])
def test_bad_model_files(run, tmp_path, fmt, how, match):
    path = damaged(run, tmp_path, fmt, how)
    with pytest.raises(RuntimeInputError, match=match) as error:
        Decoder(path)
    assert str(path) in one_line(error)


@pytest.mark.parametrize("path, match", [
    ("missing.onnx", "no such model file"), ("decoder.pb", "unknown model format"),
    ("empty-folder", "has no decoder.onnx or decoder.tflite"),
])
def test_missing_or_unknown_files(tmp_path, path, match):
    (tmp_path / "decoder.pb").write_bytes(b"x")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(RuntimeInputError, match=match) as error:
        Decoder(tmp_path / path)
    one_line(error)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_half(run, fmt):
    with pytest.raises(RuntimeInputError, match="is the encoder, not the decoder") as error:
        Decoder(run / "export" / f"encoder.{fmt}")
    one_line(error)
    with pytest.raises(RuntimeInputError, match="is the decoder, not the encoder"):
        Encoder(run / "export" / f"decoder.{fmt}")


@pytest.mark.parametrize("dtype, match", [("FLOAT", "not a kvae decoder"), ("INT64", "is int64")])
def test_a_model_that_is_not_ours(tmp_path, dtype, match):
    """A valid ONNX model with other names or integer inputs is refused by name, in one line."""
    import onnx
    from onnx import TensorProto, helper

    elem = getattr(TensorProto, dtype)
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "other",
                              [helper.make_tensor_value_info("input", elem, ["n", 4])],
                              [helper.make_tensor_value_info("output", elem, ["n", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "model.onnx")
    with pytest.raises(RuntimeInputError, match=match) as error:
        Decoder(tmp_path / "model.onnx")
    one_line(error)


def test_verify_refuses_a_changed_file(run, tmp_path):
    import shutil

    for name in ("decoder.onnx", "manifest.json"):
        shutil.copy(run / "export" / name, tmp_path / name)
    assert Decoder(tmp_path / "decoder.onnx", verify=True).latent_dim == 8
    # a changed weight: still a valid model, only the checksum can tell
    data = bytearray((tmp_path / "decoder.onnx").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(RuntimeInputError, match="does not match its manifest") as error:
        Decoder(tmp_path / "decoder.onnx", verify=True)
    one_line(error)


# --------------------------------------------------------------------------- command lines


def test_sample_cli_writes_a_png_without_tensorflow(run, blocker, tmp_path):
    from PIL import Image

    outs = []
    for name in ("a.png", "b.png"):
        result = run_without_tensorflow(blocker, ["-m", "kvae.sample", str(run / "export" / "decoder.onnx"),
                                                  "--n", "64", "--seed", "0", "--out",
                                                  str(tmp_path / name)])
        assert result.returncode == 0, result.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]  # seeded
    with Image.open(tmp_path / "a.png") as im:
        im.verify()
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.size == (8 * 58 + 2, 8 * 58 + 2)  # 8x8 of 2x-upscaled 28px
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically


def test_sample_cli_npy_and_tflite(run, blocker, tmp_path):
    result = run_without_tensorflow(blocker, ["-m", "kvae.sample", str(run), "--format", "tflite",
                                              "--n", "5", "--seed", "2", "--out", str(tmp_path / "s.npy")])
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), Decoder(run).sample(5, seed=2), atol=PARITY)


def test_encode_cli_writes_codes_without_tensorflow(run, blocker, images, tmp_path):
    from PIL import Image

    folder = tmp_path / "digits"
    folder.mkdir()
    pixels = (images[:5, ..., 0] * 255).round().astype(np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i}.png")
    result = run_without_tensorflow(blocker, ["-m", "kvae.encode", str(run), str(folder),
                                              str(folder / "0.png"), "--out", str(tmp_path / "codes.npy")])
    assert result.returncode == 0, result.stderr
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (6, 8) and codes.dtype == np.float32
    expected, _ = Encoder(run).encode(pixels)
    np.testing.assert_allclose(codes[:5], expected, atol=1e-6)
    np.testing.assert_array_equal(codes[5], codes[0])
    result = run_without_tensorflow(blocker, ["-m", "kvae.encode", str(run), str(folder),
                                              "--out", str(tmp_path / "codes.npz"), "--format", "tflite"])
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "codes.npz") as f:
        assert f["loc"].shape == f["scale"].shape == (5, 8) and len(f["files"]) == 5


@pytest.mark.parametrize("args, match", [
    (["kvae.sample", "{bad}"], "cannot load"),
    (["kvae.sample", "{run}", "--out", "grid.jpg"], "must end in .png or .npy"),
    (["kvae.encode", "{run}", "{grid}"], "encoder takes 28x28"),
    (["kvae.encode", "{run}", "{bad}"], "cannot read image"),
    (["kvae.encode", "{run}", "missing.png"], "no such image"),
])
def test_cli_errors_are_one_line(run, blocker, tmp_path, args, match):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    (tmp_path / "bad.png").write_text("not an image")
    from kvae.plots import save_grid

    save_grid(np.zeros((4, 28, 28, 1)), tmp_path / "grid.png")
    args = [a.format(bad=bad if a == "{bad}" and args[0] == "kvae.sample" else tmp_path / "bad.png",
                     run=run, grid=tmp_path / "grid.png") for a in args]
    result = run_without_tensorflow(blocker, ["-m", *args], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert match in result.stderr
