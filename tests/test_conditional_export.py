"""A conditional run (Doersch section 4) through the seam: both exports, the manifest and the
files' metadata, parity against Keras with y, the quantized files' NLL change, and the
TensorFlow-free runtime and CLI with labels. The training side: tests/test_conditional.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvae import contract

ROOT = Path(__file__).resolve().parents[1]
PARITY = 1e-5  # the float32 contract, as for unconditional files
INT8_NLL, FP16_NLL = 0.25, 0.02  # the bounds tests/test_export.py holds unconditional files to
LABEL_EFFECT = 0.005  # mean |x_mean(class a) - x_mean(class b)| at the same z (measured 0.015 on the
# 2-epoch test run; 0 when y is ignored)


@pytest.fixture(scope="module")
def cvae(exported_run):
    """A small conditional mlp run on mnist-5k with every file of both formats exported."""
    return exported_run("mlp", conditional=True)


@pytest.fixture(scope="module")
def keras_halves(cvae):
    import keras


    return tuple(keras.saving.load_model(cvae / f"{half}.keras", safe_mode=True, compile=False)
                 for half in contract.HALVES)


def one_hot(ids, k=10):
    return np.eye(k, dtype=np.float32)[np.asarray(ids)]


def label_effect(decode, latent_dim: int) -> float:
    """Mean abs change of the decoded image when only the class changes (0 if y is ignored)."""
    z = np.random.default_rng(3).standard_normal((20, latent_dim)).astype(np.float32)
    ids = np.arange(20) % 10
    return float(np.abs(decode(z, one_hot(ids)) - decode(z, one_hot((ids + 5) % 10))).mean())


def test_manifest_declares_the_condition(cvae):
    manifest = contract.read_manifest(cvae / "export")
    assert manifest["conditional"] is True and manifest["classes"] == [str(i) for i in range(10)]
    assert "y: float32 (batch, 10)" in manifest["preprocessing"]
    assert set(manifest["files"]) == {contract.filename(h, p, f) for h in contract.HALVES
                                      for p in contract.PRECISIONS for f in contract.FORMATS}
    for name, entry in manifest["files"].items():
        names = [i["name"] for i in entry["inputs"]]
        assert names == list(contract.inputs(entry["half"], conditional=True)), name
        assert entry["inputs"][1]["shape"] == ["batch", 10], name
        assert "labels" in entry["parity"]["inputs"] or "classes" in entry["parity"]["inputs"], name
        if entry["precision"] == "fp32":
            assert max(entry["parity"]["max_abs_diff"].values()) <= PARITY, name
        else:
            assert abs(entry["nll_delta"]) <= (FP16_NLL if entry["precision"] == "fp16" else INT8_NLL), name


def test_files_carry_the_classes(cvae):
    import onnx

    onnx_meta = contract.onnx_metadata(onnx.load(cvae / "export" / "decoder.onnx"))
    tflite_meta = contract.tflite_metadata(cvae / "export" / "decoder.tflite")
    for meta in (onnx_meta, tflite_meta):
        assert json.loads(meta["classes"]) == [str(i) for i in range(10)]


@pytest.mark.parametrize("name", ["decoder.onnx", "decoder.tflite", "encoder.onnx", "encoder.tflite"])
def test_float32_parity_with_keras_with_y(cvae, keras_halves, direct, name):
    """The files run by their own runtime (no kvae code) against Keras with y, at batch 64 and 1."""
    from kvae import data

    encoder, decoder = keras_halves
    call = direct(cvae / "export" / name)
    rng = np.random.default_rng(1)
    y = one_hot(rng.integers(0, 10, 64))
    if name.startswith("decoder"):
        feeds = {"z": rng.standard_normal((64, 8)).astype(np.float32), "y": y}
        want = {"x_mean": np.asarray(decoder([feeds["z"], y]))}
    else:
        x = data.binarize_fixed(data.load("mnist-5k").x_val[-64:], "dynamic")
        feeds = {"x": x, "y": y}
        loc, scale = encoder([x, y])
        want = {"loc": np.asarray(loc), "scale": np.asarray(scale)}
    got = call(**feeds)
    one = [call(**{k: v[i:i + 1] for k, v in feeds.items()}) for i in range(0, 64, 9)]
    for key, value in want.items():
        assert np.abs(got[key] - value).max() <= PARITY, (name, key)
        for i, out in zip(range(0, 64, 9), one):
            assert np.abs(out[key][0] - value[i]).max() <= PARITY, (name, key, i)


def test_exported_decoders_use_y(cvae):
    """Conditioning silently dropped fails here: the exported decoders' images change with the
    class. (A decoder trained to ignore y fails tests/test_conditional.py's label-gap checks; an
    export that dropped y would differ from Keras and fail its own self-check.)"""
    from kvae.runtime import Decoder

    for fmt in contract.FORMATS:
        decoder = Decoder(cvae / "export" / f"decoder.{fmt}")
        assert label_effect(lambda z, y: decoder.decode(z, y), 8) > LABEL_EFFECT, fmt


def test_runtime_samples_the_chosen_class(cvae, keras_halves):
    from kvae.runtime import VAE

    for fmt in contract.FORMATS:
        vae = VAE.from_folder(cvae, format=fmt)
        assert vae.classes == tuple(str(i) for i in range(10))
        images = vae.sample(6, seed=0, label=7)
        eps = np.random.default_rng(0).standard_normal((6, 8), dtype=np.float32)
        want = np.asarray(keras_halves[1]([eps, one_hot([7] * 6)]))
        assert np.abs(images - want).max() <= PARITY, fmt
        assert np.array_equal(vae.sample(6, seed=0, label="7"), images)  # a class name
        per_row = vae.sample(3, seed=0, label=[1, 2, 3])
        assert per_row.shape == (3, 28, 28, 1)
        loc, scale = vae.encode(images, label=7)
        assert loc.shape == scale.shape == (6, 8) and (scale > 0).all()
        assert np.isfinite(vae.log_likelihood((images > 0.5).astype(np.float32), k=4, label=7)).all()


@pytest.mark.parametrize("call,message", [
    (lambda vae: vae.sample(2, seed=0), "is a conditional model: pass a label"),
    (lambda vae: vae.sample(2, seed=0, label=10), "unknown label 10"),
    (lambda vae: vae.sample(2, seed=0, label="seven"), "unknown label 'seven'"),
    (lambda vae: vae.sample(2, seed=0, label=[1, 2, 3]), "one per row"),
    (lambda vae: vae.encode(np.zeros((2, 28, 28, 1), np.float32)), "pass a label"),
])
def test_runtime_label_errors_are_one_line(cvae, call, message):
    from kvae.runtime import VAE, RuntimeInputError

    with pytest.raises(RuntimeInputError, match=message) as error:
        call(VAE.from_folder(cvae))
    assert "\n" not in str(error.value)


def test_a_label_on_an_unconditional_model_is_an_error(exported_run):
    from kvae.runtime import VAE, RuntimeInputError

    vae = VAE.from_folder(exported_run("mlp"))
    assert vae.classes == ()
    with pytest.raises(RuntimeInputError, match="is not a conditional model: it takes no label"):
        vae.sample(2, seed=0, label=3)


def test_sample_cli_one_row_per_class(cvae, tmp_path):
    from PIL import Image

    out = tmp_path / "all.png"
    result = subprocess.run([sys.executable, "-m", "kvae.sample", str(cvae), "--label", "all",
                             "--n", "4", "--seed", "0", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "4 of each of 10 classes" in result.stdout
    with Image.open(out) as grid:
        assert grid.size[0] < grid.size[1]  # 4 columns, 10 rows
    npy = tmp_path / "sevens.npy"
    result = subprocess.run([sys.executable, "-m", "kvae.sample", str(cvae), "--label", "7", "--n", "3",
                             "--seed", "0", "--out", str(npy)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    from kvae.runtime import VAE

    assert np.array_equal(np.load(npy), VAE.from_folder(cvae).sample(3, seed=0, label=7))
    result = subprocess.run([sys.executable, "-m", "kvae.sample", str(cvae), "--out", str(npy)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "pass a label" in result.stderr


def test_conv_conditional_exports_with_parity(trained_run, tmp_path):
    """The conv architecture's condition (concatenated after the convolutions) converts too:
    float32 files of both formats pass their self-check through kvae.sessions."""
    from kvae import export, export_onnx, export_tflite

    run = export.load_run(trained_run("conv", conditional=True, epochs=1))
    for fmt, export_fn in (("onnx", export_onnx.export_onnx), ("tflite", export_tflite.export_tflite)):
        manifest = export_fn(run, tmp_path / fmt, quantize=())
        for half in contract.HALVES:
            entry = manifest["files"][contract.filename(half, "fp32", fmt)]
            assert [i["name"] for i in entry["inputs"]] == list(contract.inputs(half, True))
            assert max(entry["parity"]["max_abs_diff"].values()) <= PARITY, (fmt, half)
