"""Export a run's encoder and decoder to TFLite (LiteRT) and ONNX, and check every file written.

    python export/to_tflite.py RUN [--quantize fp16 int8] [--out DIR] [--fixed-batch 1]
    python export/to_onnx.py RUN [--quantize fp16 int8] [--out DIR]

Writes into RUN/export/ (the contract in DESIGN.md):
    encoder.tflite decoder.tflite encoder.onnx decoder.onnx            float32
    <half>.fp16.<ext> <half>.int8.<ext>                                quantized variants
    manifest.json                                                      one entry per file
Signatures (both formats): encoder `x` (batch, H, W, C) in [0, 1] -> `loc`, `scale` (batch, D);
decoder `z` (batch, D) -> `x_mean` (batch, H, W, C).

How each file is made:
- TFLite: Keras model -> SavedModel (`keras.export.ExportArchive`) -> `TFLiteConverter.
  from_saved_model`, builtin ops only (no Flex). `from_concrete_functions` is never used: it writes
  weightless files whose output is NaN (TOOLCHAIN.md). fp16 = float16 weights; int8 = full integer
  (`static`) with float32 I/O, calibrated on the run's own training images (encoder) and on z
  from the prior and from the posterior of training images (decoder), or dynamic range
  (`dynamic`: int8 weights, float activations).
- ONNX: `tf2onnx.convert.from_function`, opset 17, batch dim named `batch`. fp16 = float16
  weights, each followed by a Cast to float32 (float32 I/O and arithmetic, half the size, runs on
  every onnxruntime build). int8 = onnxruntime's static QDQ (calibrated like TFLite's) or dynamic
  quantization, both with uint8 weights and activations (INT8_TYPES says why).
- int8 `best` (the default) builds both methods and keeps the one whose NLL change is lower on
  training images that calibration did not use; the manifest's nll_delta is then measured on
  validation images. Full integer is the faster one but quantizes the decoder's sigmoid output to
  steps of 1/256; the dynamic-range TFLite decoder is slow through the dynamic-batch
  `serving_default` (hybrid Conv2DTranspose), so kvae.runtime feeds it through the fixed-batch
  signatures. Sizes, NLL changes and latencies: bench/results/latency.json (bench/latency.py).

Batch in TFLite. Every .tflite file has two signatures sharing one copy of the weights:
`serving_default` with a dynamic batch (resized to any batch) and `batch1`, fixed at batch 1
(`--fixed-batch 1 64` adds `batch64`, ...). XNNPACK cannot take a Conv2DTranspose whose output
shape is computed at run time, so a fixed signature is the fast path for the conv decoder; a
fixed signature adds a small part to the file (its latency and size: bench/latency.py).
The manifest's "batch" is "dynamic" (the serving_default signature) and "signatures" maps each
signature to its batch.

Self-check (before a file gets its final name): the file is written under a temporary name,
loaded in its runtime (ai_edge_litert Interpreter / onnxruntime; ONNX also through
`onnx.checker.check_model(full_check=True)`), run at batch 1 and 64 on validation images of the
run's dataset and on z from the prior and the posterior, and compared with Keras. A non-finite
output or a difference above TOLERANCE raises KVAEError with the measured number; the temporary
file is removed and nothing stays under the final name. Quantized files also get `nll_delta`:
the change in validation IWAE NLL (nats, NLL_N images, NLL_K samples each) against float32 Keras
with paired samples: the same images, the same eps, and for a decoder the float32 encoder's
posterior (for an encoder: its posterior as the proposal, with the float32 decoder). Choose a
variant by that, not by max abs diff. NLL_N = 200 and NLL_K = 50 keep each script under a minute
on 2 cores for the quickstart model; the paired difference's standard error is recorded with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from kvae import iwae
from kvae.contract import (HALVES, INPUT, OUTPUTS, PRECISIONS, QUANTIZED, add_tflite_metadata,  # noqa: F401
                           filename, set_onnx_metadata, sha256, tflite_metadata, update_manifest)
from kvae.errors import KVAEError, describe_os_error
from kvae.files import atomic_path, atomic_write_text, remove_stale_temps

OPSET = 17
PIXEL_RANGE = "[0, 1]"
INT8_METHODS = ("best", "static", "dynamic")
FIXED_BATCHES = (1,)  # TFLite fast-path signatures `batch<N>` next to the dynamic serving_default

# Self-check bounds on max abs diff against Keras. A file beyond them is not written. float32 is
# absolute (the contract's 1e-5); fp16 and int8 bounds are multiplied by max(1, max |Keras
# output|), since their error grows with the magnitude of loc. int8 bounds only catch a broken
# file (a quantized file's quality is its nll_delta). Measured (the quickstart conv run, 30
# epochs, and the test runs, conv and mlp): float32 <= 3.1e-6; fp16 x_mean <= 4.8e-4, loc <= 7.1e-4,
# scale <= 3.9e-4; int8 x_mean <= 0.096 (mean 0.0036), loc <= 0.041 (mean 0.010), scale <= 0.020
# (mean 0.006). The 100-epoch quickstart (filters 16, lr 2e-3) reached fp16 x_mean 1.55e-3 (mean
# 2.4e-5) on its batch64 signature: fp16 bounds also only catch a broken file (its quality is its
# nll_delta, +0.001 nats there); tests/test_export.py holds the test models to 1e-3.
TOLERANCE = {
    "fp32": {"loc": 1e-5, "scale": 1e-5, "x_mean": 1e-5},
    "fp16": {"loc": 1e-2, "scale": 1e-2, "x_mean": 5e-3},
    "int8": {"loc": 0.5, "scale": 0.5, "x_mean": 0.5},
}
# ... and on mean abs diff (int8 only: a few large pixel errors are normal, a shifted image is not;
# a decoder with zeroed weights is off by ~0.3 on average).
MEAN_TOLERANCE = {"int8": {"loc": 0.1, "scale": 0.1, "x_mean": 0.05},
                  "fp16": {"loc": 1e-3, "scale": 1e-3, "x_mean": 1e-3}}

PARITY_N = 64  # validation images (and z) compared with Keras, at batch 64 and one by one
NLL_N = 200  # validation images for nll_delta
NLL_K = 50  # importance samples per image for nll_delta
CALIBRATION_N = 200  # training images (and z) for int8 calibration
NLL_SEED = 0  # seeds the checks' z (NLL_SEED) and nll_delta's eps (NLL_SEED + 1), shared by all variants


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# The run: Keras models and the data every check uses


@dataclasses.dataclass
class Run:
    """A trained run loaded for export: the Keras halves and the inputs every check uses.

    Attributes:
      path: the run folder.
      config: its kvae.config.Config.
      encoder: Keras x -> [loc, scale].
      decoder: Keras z -> x_mean.
      x_parity: (PARITY_N, H, W, C) held-out images, preprocessed as in evaluation.
      z_parity: (2 * PARITY_N, D) z ~ N(0, I) then z ~ Q(z|X) of held-out images.
      x_nll: (NLL_N, H, W, C) held-out images for nll_delta; loc_nll, scale_nll their Keras posterior.
      eps_nll: (NLL_K, NLL_N, D) the eps shared by every variant.
      x_calibration, z_calibration: int8 calibration inputs from the training split and the prior.
      x_select: (<= NLL_N, H, W, C) training images not used for calibration; loc_select,
        scale_select their Keras posterior; eps_select their eps. The int8 method is chosen on
        these and reported on the held-out x_nll (a number used for a choice is not a report).
    """

    path: Path
    config: object
    encoder: object
    decoder: object
    x_parity: np.ndarray
    z_parity: np.ndarray
    x_nll: np.ndarray
    loc_nll: np.ndarray
    scale_nll: np.ndarray
    eps_nll: np.ndarray
    x_calibration: np.ndarray
    z_calibration: np.ndarray
    dataset: str
    x_select: np.ndarray
    loc_select: np.ndarray
    scale_select: np.ndarray
    eps_select: np.ndarray
    select_source: str = "training images not used for calibration"
    _nll_fp32: dict = dataclasses.field(default_factory=dict)
    _keras_decode: Callable | None = None

    @property
    def latent_dim(self) -> int:
        return int(self.decoder.inputs[0].shape[-1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.encoder.inputs[0].shape[1:])

    @property
    def likelihood(self) -> str:
        return self.config.likelihood

    @property
    def sigma(self) -> float:
        return float(self.config.sigma)

    def keras_outputs(self, half: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Float32 Keras outputs by contract name."""
        if half == "encoder":
            loc, scale = self.encoder(inputs, training=False)
            return {"loc": np.asarray(loc), "scale": np.asarray(scale)}
        return {"x_mean": np.asarray(self.decoder(inputs, training=False))}

    def parity_inputs(self, half: str) -> np.ndarray:
        return self.x_parity if half == "encoder" else self.z_parity

    def parity_description(self, half: str) -> str:
        n = len(self.x_parity)
        if half == "encoder":
            return (f"{n} validation {self.dataset} images ({self.preprocessing_short()}), "
                    f"at batch {n} and batch 1")
        return (f"{n} z ~ N(0, I) and {n} z ~ Q(z|X) of validation {self.dataset} images, "
                f"at batch {n} and batch 1")

    def preprocessing_short(self) -> str:
        mode = self.config.resolved_binarize
        return "binarized with a fixed seed" if mode == "dynamic" else (
            "binarized at 0.5" if mode == "static" else "pixels / 255")

    def nll_images(self, images: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x, loc, scale, eps) of `held_out` (what nll_delta reports) or `selection` images."""
        if images == "held_out":
            return self.x_nll, self.loc_nll, self.scale_nll, self.eps_nll
        return self.x_select, self.loc_select, self.scale_select, self.eps_select

    def nll_fp32(self, images: str = "held_out") -> np.ndarray:
        """Per-image NLL with the float32 Keras decoder on `images` (computed once)."""
        if images not in self._nll_fp32:
            self._nll_fp32[images] = iwae.nll(*self.nll_images(images), self.keras_decode(),
                                              self.likelihood, self.sigma)
        return self._nll_fp32[images]

    def keras_decode(self) -> Callable[[np.ndarray], np.ndarray]:
        if self._keras_decode is None:
            self._keras_decode = keras_decode(self.decoder)
        return self._keras_decode


def load_run(run: str | Path) -> Run:
    """Loads RUN's Keras halves, config and data, and draws every check's inputs (seeded).

    Raises:
      KVAEError: RUN is not a finished run folder, or its files or dataset cannot be read.
    """
    from kvae import data as kdata
    from kvae.config import Config

    run = Path(run)
    if not run.is_dir():
        raise KVAEError(f"no such run folder: {run} (train one with python -m kvae.fit --out {run})")
    if not (run / "config.json").exists():
        raise KVAEError(f"{run} is not a run folder (no config.json); train one with python -m kvae.fit")
    for name in ("encoder.keras", "decoder.keras"):
        if not (run / name).exists():
            raise KVAEError(f"{run} has no {name}: its training has not finished "
                            "(continue it with python -m kvae.fit --resume --out RUN)")
    config = Config.from_json(run / "config.json")
    data = kdata.load(config.dataset, config.data_dir, config.val_size, image_size=config.image_size)

    import keras

    models = {}
    for name in HALVES:
        if not zipfile.is_zipfile(run / f"{name}.keras"):  # Keras would say "File not found"
            raise KVAEError(f"{run / (name + '.keras')} is not a complete .keras file (truncated or "
                            f"corrupt): write it again with python -m kvae.fit --resume --out {run}")
        try:
            models[name] = keras.saving.load_model(run / f"{name}.keras", safe_mode=True, compile=False)
        except Exception as e:  # a truncated or corrupt .keras file
            raise KVAEError(f"cannot load {run / (name + '.keras')}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    encoder, decoder = models["encoder"], models["decoder"]
    image_shape = tuple(int(d) for d in encoder.inputs[0].shape[1:])
    if data.image_shape != image_shape:
        raise KVAEError(f"{config.dataset} images are {data.image_shape}, the model takes {image_shape}")
    latent_dim = int(decoder.inputs[0].shape[-1])

    mode = config.resolved_binarize
    rng = np.random.default_rng(NLL_SEED)
    x_val = kdata.binarize_fixed(data.x_val, mode)  # as kvae.evaluate sees held-out data
    x_parity = x_val[:PARITY_N]
    x_nll = x_val[:NLL_N]
    x_calibration = kdata.binarize_fixed(data.x_train[:CALIBRATION_N], mode, seed=kdata.EVAL_SEED + 1)

    def posterior_sample(x):
        loc, scale = (np.asarray(t) for t in encoder(x, training=False))
        return loc, scale, (loc + scale * rng.standard_normal(loc.shape)).astype(np.float32)

    _, _, z_post = posterior_sample(x_parity)
    z_parity = np.concatenate([rng.standard_normal((len(x_parity), latent_dim)).astype(np.float32),
                               z_post])
    _, _, z_cal = posterior_sample(x_calibration)
    z_calibration = np.concatenate(
        [rng.standard_normal((len(x_calibration), latent_dim)).astype(np.float32), z_cal])
    loc_nll, scale_nll, _ = posterior_sample(x_nll)
    eps_nll = np.random.default_rng(NLL_SEED + 1).standard_normal(
        (NLL_K, len(x_nll), latent_dim)).astype(np.float32)
    x_select = data.x_train[CALIBRATION_N:CALIBRATION_N + NLL_N]
    select_source = "training images not used for calibration"
    if len(x_select) < 2:  # a tiny training set: its calibration images are all there is
        x_select, select_source = data.x_train[:NLL_N], "training images (also the calibration ones)"
    x_select = kdata.binarize_fixed(np.asarray(x_select), mode, seed=kdata.EVAL_SEED + 2)
    loc_select, scale_select = (np.asarray(t) for t in encoder(x_select, training=False))
    eps_select = np.random.default_rng(NLL_SEED + 2).standard_normal(
        (NLL_K, len(x_select), latent_dim)).astype(np.float32)
    return Run(run, config, encoder, decoder, x_parity, z_parity, x_nll, loc_nll, scale_nll,
               eps_nll, x_calibration, z_calibration, config.dataset, x_select, loc_select,
               scale_select, eps_select, select_source)


# ----------------------------------------------------------------------------------------------
# Held-out NLL with paired samples


def keras_decode(decoder) -> Callable[[np.ndarray], np.ndarray]:
    """A numpy decode function around a Keras decoder, traced once (tf.function)."""
    import tensorflow as tf

    fn = tf.function(lambda z: decoder(z, training=False), reduce_retracing=True)
    return lambda z: fn(tf.constant(z)).numpy()


def nll_entry(run: Run, decode: Callable[[np.ndarray], np.ndarray] | None = None,
              loc: np.ndarray | None = None, scale: np.ndarray | None = None,
              what: str = "decoder", images: str = "held_out",
              p_range: tuple[float, float] = iwae.P_FLOAT32) -> dict:
    """Change in NLL when one half is replaced by an exported variant (paired).

    A decoder variant is scored with the float32 Keras encoder's (loc, scale); an encoder
    variant's (loc, scale) are the proposal Q(z|X) with the float32 Keras decoder. Same eps.

    Args:
      images: `held_out` (the reported nll_delta) or `selection` (training images that choose
        the int8 method; see Run).
      p_range: the clip rule for the decoder's probabilities (kvae.iwae.p_range of the file).

    Returns:
      {"nll_delta": mean change in nats, "nll": {fp32, variant, delta_se, n, k, inputs}}.
    """
    x, loc0, scale0, eps = run.nll_images(images)
    reference = run.nll_fp32(images)
    nll = iwae.nll(x, loc0 if loc is None else loc, scale0 if scale is None else scale, eps,
                   decode or run.keras_decode(), run.likelihood, run.sigma, p_range)
    diff = nll - reference
    if not np.all(np.isfinite(diff)):
        raise KVAEError(f"NLL with the exported {what} is not finite")
    other = "loc, scale from the float32 Keras encoder" if what == "decoder" else (
        "this encoder's loc, scale as the proposal, the float32 Keras decoder")
    source = (f"validation {run.dataset} images" if images == "held_out" else
              f"{run.dataset} {run.select_source}")
    seed = NLL_SEED + (1 if images == "held_out" else 2)
    return {"nll_delta": round(float(diff.mean()), 4) + 0.0,  # + 0.0: no "-0.0" in the manifest
            "nll": {"fp32": round(float(reference.mean()), 3), "variant": round(float(nll.mean()), 3),
                    "delta_se": round(float(diff.std(ddof=1) / math.sqrt(len(diff))), 4)
                    if len(diff) > 1 else None,
                    "n": int(len(diff)), "k": int(eps.shape[0]),
                    "inputs": f"{source} ({run.preprocessing_short()}); {other}; "
                              f"the same eps for every variant (seed {seed})"}}


def _nll_of_file(run: Run, half: str, runner, batch: int, images: str = "held_out",
                 signature: str | None = None, p_range: tuple[float, float] = iwae.P_FLOAT32) -> dict:
    """nll_entry for an exported half run by `runner` in batches of `batch` (recorded: a
    dynamically quantized file's output depends on the other rows of its batch)."""
    if half == "decoder":
        entry = nll_entry(run, _numpy_fn(runner, "z", "x_mean", batch), images=images, p_range=p_range)
    else:
        out = _batches(runner, "x", run.nll_images(images)[0], batch)
        entry = nll_entry(run, loc=out["loc"], scale=out["scale"], what="encoder", images=images)
    entry["nll"]["batch"] = batch
    if signature:
        entry["nll"]["signature"] = signature
    return entry


# ----------------------------------------------------------------------------------------------
# Runtimes and the parity check


@contextlib.contextmanager
def _quiet():
    """Sends the converters' C++ chatter on stdout/stderr (fd level) to a file; replays it on error."""
    import sys
    import warnings

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile("w+") as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            sink.seek(0)
            tail = sink.read()[-4000:]
            if tail.strip():
                sys.stderr.write(tail)
            raise
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


# Measured with 1 thread (robust on a shared 2-core machine: a second thread that has to wait
# for a busy core made batch-64 int8 decoding 25x slower there).
class LiteRTRunner:
    """Calls one signature of a .tflite file by input/output name (never by output order)."""

    def __init__(self, path: str | Path, signature: str = "serving_default", num_threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        with _quiet():
            self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner(signature)

    def __call__(self, name: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.runner(**{name: np.ascontiguousarray(inputs)}).items()}


class ORTRunner:
    """Calls an ONNX file in onnxruntime (CPU), outputs by name."""

    def __init__(self, path: str | Path, num_threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, name: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(None, {name: inputs})))


def _batches(fn, name: str, inputs: np.ndarray, batch: int | None) -> dict[str, np.ndarray]:
    """Runs fn on inputs in batches of `batch` (None: all at once); concatenates outputs."""
    step = len(inputs) if batch is None else batch
    parts = [fn(name, inputs[i:i + step]) for i in range(0, len(inputs), step)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def parity(half: str, precision: str, reference: dict[str, np.ndarray],
           results: list[dict[str, np.ndarray]], filename: str) -> dict:
    """Max and mean abs diff of each run's outputs against Keras; raises if beyond TOLERANCE.

    Args:
      results: outputs of the file for the same inputs as `reference` (e.g. batch 64 and batch 1).

    Raises:
      KVAEError: an output is missing, has the wrong shape, is not finite, or differs too much.
    """
    max_diff, mean_diff = {}, {}
    for name in OUTPUTS[half]:
        diffs = []
        for out in results:
            if name not in out:
                raise KVAEError(f"{filename}: self-check failed: output {name!r} missing (got {sorted(out)})")
            if out[name].shape != reference[name].shape:
                raise KVAEError(f"{filename}: self-check failed: output {name!r} has shape "
                                f"{out[name].shape}, Keras gives {reference[name].shape}")
            if not np.all(np.isfinite(out[name])):
                bad = int(np.sum(~np.isfinite(out[name])))
                raise KVAEError(f"{filename}: self-check failed: {bad} of {out[name].size} values "
                                f"of {name!r} are NaN or infinite (a weightless or broken export)")
            diffs.append(np.abs(out[name].astype(np.float64) - reference[name]))
        d = np.stack(diffs)
        max_diff[name] = float(d.max())
        mean_diff[name] = float(d.mean())
        size = 1.0 if precision == "fp32" else max(1.0, float(np.abs(reference[name]).max()))
        bound = TOLERANCE[precision][name] * size
        mean_bound = MEAN_TOLERANCE.get(precision, {}).get(name)
        mean_bound = None if mean_bound is None else mean_bound * size
        if max_diff[name] > bound or (mean_bound is not None and mean_diff[name] > mean_bound):
            raise KVAEError(f"{filename}: self-check failed: {name!r} differs from Keras by up to "
                            f"{max_diff[name]:.3g} (mean {mean_diff[name]:.3g}); the bound for "
                            f"{precision} is {bound:.3g}"
                            + (f" (mean {mean_bound:.3g})" if mean_bound else ""))
    return {"max_abs_diff": {k: float(f"{v:.3g}") for k, v in max_diff.items()},
            "mean_abs_diff": {k: float(f"{v:.3g}") for k, v in mean_diff.items()}}


# ----------------------------------------------------------------------------------------------
# Writing, manifest and metadata


def io_spec(run: Run, half: str) -> tuple[list[dict], list[dict]]:
    d, image = run.latent_dim, list(run.image_shape)
    if half == "encoder":
        inputs = [{"name": "x", "shape": ["batch", *image], "dtype": "float32"}]
        outputs = [{"name": n, "shape": ["batch", d], "dtype": "float32"} for n in OUTPUTS[half]]
    else:
        inputs = [{"name": "z", "shape": ["batch", d], "dtype": "float32"}]
        outputs = [{"name": "x_mean", "shape": ["batch", *image], "dtype": "float32"}]
    return inputs, outputs


def metadata(run: Run, half: str, precision: str) -> dict[str, str]:
    """Key-value metadata stored inside each file (ONNX metadata_props; TFLite `kvae` buffer)."""
    from kvae import __version__

    return {"kvae_version": __version__, "half": half, "precision": precision,
            "latent_dim": str(run.latent_dim), "image_shape": json.dumps(list(run.image_shape)),
            "likelihood": run.likelihood, "sigma": repr(run.sigma), "pixel_range": PIXEL_RANGE}


def preprocessing(run: Run) -> str:
    mode = run.config.resolved_binarize
    text = ("x: float32 (batch, H, W, C), channels last, pixel values in [0, 1] (uint8 / 255). ")
    if mode == "dynamic":
        text += ("The model was trained on binarized pixels (each pixel 1 with probability x); "
                 "the export's checks use validation x binarized with a fixed seed. ")
    elif mode == "static":
        text += "The model was trained on pixels binarized at 0.5 (x > 0.5). "
    text += ("z: float32 (batch, latent_dim); sample z ~ N(0, I), or z = loc + scale * eps with "
             "eps ~ N(0, I), with the host's random numbers (no random ops in the files). "
             f"x_mean: float32 in [0, 1], the {run.likelihood} mean of P(X|z).")
    return text


def manifest_header(run: Run) -> dict:
    from kvae import __version__

    return {"kvae_version": __version__, "latent_dim": run.latent_dim,
            "image_shape": list(run.image_shape), "likelihood": run.likelihood, "sigma": run.sigma,
            "preprocessing": preprocessing(run),
            "source": {name: sha256(run.path / name) for name in ("encoder.keras", "decoder.keras")}}


def _entry(path: Path, run: Run, half: str, fmt: str, precision: str, check: dict, **extra) -> dict:
    inputs, outputs = io_spec(run, half)
    entry = {"half": half, "format": fmt, "precision": precision, "sha256": sha256(path),
             "size": path.stat().st_size, "inputs": inputs, "outputs": outputs}
    if fmt == "onnx":
        entry["opset"] = OPSET
    entry.update(extra)
    entry["parity"] = {**check, "inputs": run.parity_description(half)}
    return entry


@contextlib.contextmanager
def _written(path: Path, data: bytes):
    """Writes `data` under a temporary name next to `path`; renames it only if the block passes.

    On failure the temporary file is removed and an older file under `path` too (it would not
    match the run any more): nothing stays under the final name.
    """
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
            yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise


# ----------------------------------------------------------------------------------------------
# TFLite


def _savedmodel(run: Run, half: str, folder: Path, fixed_batches: tuple[int, ...]) -> list[str]:
    """Writes a SavedModel with `serving_default` (dynamic batch) and `batch<N>` signatures."""
    import keras
    import tensorflow as tf

    model = run.encoder if half == "encoder" else run.decoder
    shape = run.image_shape if half == "encoder" else (run.latent_dim,)
    archive = keras.export.ExportArchive()
    archive.track(model)
    keys = []
    for batch in (None, *fixed_batches):
        if half == "encoder":
            def fn(x):
                loc, scale = model(x, training=False)
                return {"loc": loc, "scale": scale}
        else:
            def fn(z):
                return {"x_mean": model(z, training=False)}
        key = "serving_default" if batch is None else f"batch{batch}"
        archive.add_endpoint(key, fn, input_signature=[
            tf.TensorSpec((batch, *shape), tf.float32, name=INPUT[half])])
        keys.append(key)
    try:
        with _quiet():
            archive.write_out(str(folder), verbose=False)
    except tf.errors.OpError as e:  # e.g. a full disk where the temporary SavedModel goes
        reason = e.message.split(";")[-1].split("[Op:")[0].strip()
        raise KVAEError(f"cannot write the {half}'s temporary SavedModel in {folder.parent}: {reason} "
                        "(free disk space there, or point TMPDIR at a folder with room)") from None
    return keys


def _nll_of_tflite(run: Run, half: str, path: Path, keys: list[str], images: str = "held_out",
                   p_range: tuple[float, float] = iwae.P_FLOAT32) -> dict:
    """_nll_of_file for a .tflite file, row by row through `batch1` when it has one (fastest)."""
    signature = "batch1" if "batch1" in keys else "serving_default"
    return _nll_of_file(run, half, LiteRTRunner(path, signature),
                        1 if signature == "batch1" else 64, images, signature, p_range)


def _tflite_int8(run: Run, half: str, savedmodel: Path, keys: list[str], calibration: np.ndarray,
                 folder: Path, int8: str = "best") -> tuple[bytes, dict]:
    """Full-integer (`static`: calibrated int8 activations) and dynamic-range (`dynamic`: int8
    weights, float activations) candidates, one kept by `_best_int8`.
    Full-integer is the faster one, but it quantizes the decoder's sigmoid output to steps of
    1/256, which costs NLL on confident pixels."""

    def build(method: str):
        data = _tflite_bytes(savedmodel, keys, "int8", calibration, INPUT[half], method)
        path = folder / f"{half}.{method}.tflite"
        path.write_bytes(data)
        return data, len(data), lambda images: _nll_of_tflite(run, half, path, keys, images,
                                                              iwae.p_range("int8", method))

    data, extra = _best_int8("TFLite", half, int8, build)
    return data, {**extra, "int8_types": INT8_TYPES["tflite", extra["quantization"]]}


def _tflite_bytes(savedmodel: Path, keys: list[str], precision: str, calibration: np.ndarray,
                  input_name: str, method: str = "static") -> bytes:
    """Converts a SavedModel to a .tflite flatbuffer, builtin ops only.

    int8 `method`: `static` = full integer, calibrated on `calibration`; `dynamic` = int8
    weights with float activations (dynamic-range quantization, no calibration).
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(savedmodel), signature_keys=keys)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex ops
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8" and method == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.float32  # float I/O; quantize inside
        converter.inference_output_type = tf.float32

        def representative():  # every signature sees every row, in its own batch size
            for key in keys:
                batch = 1 if key == "serving_default" else int(key[len("batch"):])
                for start in range(0, len(calibration), batch):
                    rows = np.take(calibration, range(start, start + batch), axis=0, mode="wrap")
                    yield key, {input_name: rows}

        converter.representative_dataset = representative
    try:
        with _quiet():
            return converter.convert()
    except Exception as e:
        raise KVAEError(f"TFLite conversion ({precision}) failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[-1][:300]}") from None


def _check_tflite(path: Path, run: Run, half: str, precision: str, keys: list[str], name: str) -> dict:
    """Loads a written .tflite file in LiteRT and compares every signature with Keras."""
    inputs = run.parity_inputs(half)
    reference = run.keras_outputs(half, inputs)
    results = []
    try:
        signatures = LiteRTRunner(path).interpreter.get_signature_list()
        want = {"inputs": [INPUT[half]], "outputs": sorted(OUTPUTS[half])}
        got = {k: {"inputs": v["inputs"], "outputs": sorted(v["outputs"])} for k, v in signatures.items()}
        if got != {key: want for key in keys}:
            raise KVAEError(f"{name}: self-check failed: signatures {got}, expected {keys} with {want}")
        for key in keys:
            runner = LiteRTRunner(path, key)
            if key == "serving_default":
                results.append(_batches(runner, INPUT[half], inputs, None))
                results.append(_batches(runner, INPUT[half], inputs, 1))
            else:
                results.append(_batches(runner, INPUT[half], inputs, int(key[len("batch"):])))
    except KVAEError:
        raise
    except Exception as e:  # LiteRT cannot load or run it
        raise KVAEError(f"{name}: self-check failed: LiteRT cannot run it: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from None
    return parity(half, precision, reference, results, name)


def script_parser(prog: str, description: str):
    """The arguments both export scripts share: RUN, --out and --quantize."""
    from kvae.cli import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("run", help="run folder written by python -m kvae.fit")
    parser.add_argument("--out", help="output folder (default: RUN/export)")
    parser.add_argument("--quantize", nargs="+", choices=("fp16", "int8", "all", "none"),
                        default=["all"], help="quantized variants to write besides float32 "
                        "(default: all = fp16 int8; none = float32 only)")
    parser.add_argument("--int8", choices=INT8_METHODS, default="best",
                        help="int8 method: static (calibrated int8 activations: the fastest), "
                             "dynamic (int8 weights, float activations) or best (default: both "
                             "are built, the one that changes the NLL less on training images is kept)")
    return parser


def quantized(choice: list[str]) -> tuple[str, ...]:
    """--quantize's values -> the precisions to write besides float32."""
    return QUANTIZED if "all" in choice else tuple(q for q in choice if q != "none")


def export_tflite(run: str | Path | Run, out: str | Path | None = None,
                  quantize: tuple[str, ...] = QUANTIZED,
                  fixed_batches: tuple[int, ...] = FIXED_BATCHES, int8: str = "best") -> dict:
    """Writes encoder/decoder .tflite files (float32 and `quantize` variants) and their manifest.

    Args:
      run: a run folder (or a loaded Run).
      out: output folder (default RUN/export).
      quantize: quantized variants besides float32: any of `fp16`, `int8`.
      fixed_batches: batch sizes of the extra fixed-batch signatures `batch<N>` (fast path).
      int8: `static` (full integer, calibrated), `dynamic` (int8 weights, float activations)
        or `best` (both built; the one whose NLL change on the selection images is lower is
        written, both recorded under "int8_candidates").

    Returns:
      The manifest (dict) after merging this export's entries.

    Raises:
      KVAEError: bad run, failed conversion, or a file that failed its self-check.
    """
    _methods(int8)  # a bad value fails before any work
    run = run if isinstance(run, Run) else load_run(run)
    fixed_batches = tuple(sorted({int(b) for b in fixed_batches if int(b) > 0}))
    savedmodels = {}

    def write(half: str, precision: str, path: Path, tmp: Path) -> dict:
        if half not in savedmodels:
            savedmodels[half] = _savedmodel(run, half, tmp / half, fixed_batches)
        keys = savedmodels[half]
        calibration = run.x_calibration if half == "encoder" else run.z_calibration
        values = metadata(run, half, precision)
        if precision == "int8":
            data, extra = _tflite_int8(run, half, tmp / half, keys, calibration, tmp, int8)
            values["quantization"] = extra["quantization"]
        else:
            data = _tflite_bytes(tmp / half, keys, precision, calibration, INPUT[half])
            extra = {}
        data = add_tflite_metadata(data, values)
        with _written(path, data) as written:
            check = _check_tflite(written, run, half, precision, keys, path.name)
            if precision == "fp16":
                extra = _nll_of_tflite(run, half, written, keys)
            signatures = {k: "dynamic" if k == "serving_default" else int(k[len("batch"):]) for k in keys}
            return _entry(written, run, half, "tflite", precision, check, batch="dynamic",
                          signatures=signatures, **extra)

    return _export_all(run, out, "tflite", quantize, write)


def _export_all(run: Run, out, fmt: str, quantize, write: Callable) -> dict:
    """Writes every (half, precision) file with `write` and merges the entries into the manifest.

    On a failure the entries written so far are still recorded, the failed file's entry is
    dropped, and the error propagates.
    """
    out = Path(out) if out else run.path / "export"
    if out.exists() and not out.is_dir():
        raise KVAEError(f"--out {out} is a file, not a folder")
    unknown = sorted(set(quantize) - set(QUANTIZED))
    if unknown:
        raise KVAEError(f"unknown --quantize {', '.join(unknown)}: choose from {', '.join(QUANTIZED)}")
    precisions = ("fp32", *[p for p in QUANTIZED if p in quantize])
    header = manifest_header(run)
    entries, name = {}, None
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)  # files a killed export was writing
        with tempfile.TemporaryDirectory(prefix="kvae-export-") as tmp:
            for half in HALVES:
                for precision in precisions:
                    started = time.perf_counter()
                    name = filename(half, precision, fmt)
                    entries[name] = write(half, precision, out / name, Path(tmp))
                    log(_summary(name, entries[name], time.perf_counter() - started))
            name = None
    except OSError as e:
        raise KVAEError(f"cannot write to {out}: {describe_os_error(e)}") from None
    finally:
        if name is not None:  # failed: keep what passed, forget the failed file
            with contextlib.suppress(OSError):
                update_manifest(out, header, entries, removed=(name,))
    return update_manifest(out, header, entries)


def _numpy_fn(runner, input_name: str, output: str, chunk: int = 64):
    return lambda v: _batches(runner, input_name, v, chunk)[output]


def _summary(name: str, entry: dict, seconds: float) -> str:
    diff = ", ".join(f"{k} {v:.2g}" for k, v in entry["parity"]["max_abs_diff"].items())
    text = f"kvae.export: wrote {name} ({entry['size'] / 1e6:.2f} MB): max abs diff vs Keras {diff}"
    if "nll_delta" in entry:
        text += f"; validation NLL {entry['nll_delta']:+.3f} nats vs float32"
    return text + f" [{seconds:.1f} s]"


# ----------------------------------------------------------------------------------------------
# ONNX


def _onnx_model(run: Run, half: str):
    """Keras half -> onnx.ModelProto (opset 17), I/O named by the contract, batch dim `batch`."""
    import tensorflow as tf
    import tf2onnx

    model = run.encoder if half == "encoder" else run.decoder
    shape = run.image_shape if half == "encoder" else (run.latent_dim,)
    spec = [tf.TensorSpec((None, *shape), tf.float32, name=INPUT[half])]
    if half == "encoder":
        @tf.function(input_signature=spec)
        def fn(x):
            loc, scale = model(x, training=False)
            return {"loc": loc, "scale": scale}
    else:
        @tf.function(input_signature=spec)
        def fn(z):
            return {"x_mean": model(z, training=False)}
    try:
        with _quiet():
            proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET)
    except Exception as e:
        raise KVAEError(f"ONNX conversion of the {half} failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[-1][:300]}") from None
    return _contract_names(proto, half)


def _contract_names(proto, half: str):
    """Renames graph inputs/outputs to the contract's names and their batch dim to `batch`."""
    graph = proto.graph
    wanted_in, wanted_out = [INPUT[half]], list(OUTPUTS[half])
    renames = {}
    for values, wanted in ((graph.input, wanted_in), (graph.output, wanted_out)):
        names = [v.name for v in values]
        if len(names) != len(wanted):
            raise KVAEError(f"ONNX {half} has I/O {names}, expected {wanted}")
        for v, want in zip(values, wanted):
            base = v.name.split(":")[0]
            if base != want and v.name != want:
                raise KVAEError(f"ONNX {half} has I/O {names}, expected {wanted}")
            if v.name != want:
                renames[v.name] = want
                v.name = want
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    batch_params = set()
    for v in (*graph.input, *graph.output):
        dim = v.type.tensor_type.shape.dim[0]
        if dim.dim_param:
            batch_params.add(dim.dim_param)
        dim.Clear()
        dim.dim_param = "batch"
    for v in graph.value_info:
        for dim in v.type.tensor_type.shape.dim:
            if dim.dim_param in batch_params:
                dim.dim_param = "batch"
    return proto


def fp16_weights(proto, min_size: int = 16):
    """Stores float32 initializers of >= min_size values as float16, each followed by a Cast.

    Inputs, outputs and arithmetic stay float32 (onnxruntime folds the Casts when it loads the
    file), so the file is about half the size and runs on every build; the error is float16
    rounding of the weights (like TFLite's float16 quantization on CPU).
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    casts, keep = [], []
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) >= min_size:
            values = numpy_helper.to_array(init)
            half = numpy_helper.from_array(values.astype(np.float16), init.name + "_fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT,
                                          name=init.name + "_to_fp32"))
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return proto


class _Reader:
    """onnxruntime CalibrationDataReader over rows of calibration data (batch 1 each)."""

    def __init__(self, name: str, rows: np.ndarray):
        self.name, self.rows, self.i = name, rows, 0

    def get_next(self):
        if self.i >= len(self.rows):
            return None
        self.i += 1
        return {self.name: self.rows[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0


# int8 types of each method (recorded in the manifest as "int8_types"). ONNX uses uint8 weights
# as well as uint8 activations (U8U8) for both methods: with int8 weights (U8S8, and S8S8, which
# x86 runs as U8S8) onnxruntime's x86 kernels for CPUs with AVX2 or AVX-512 but without VNNI
# (e.g. AMD Zen 3, Intel Skylake) add pairs of products in saturating 16-bit integers, so such a
# CPU computes another model than the one checked here (issue #13: `loc` 0.7 off on a Zen 3);
# U8U8 widens to 16 bits first and gives the same integers on every CPU. TFLite's int8 kernels
# accumulate in 32 bits on every CPU. tests/test_export.py runs the files under an emulated
# AVX2 CPU without VNNI (qemu-x86_64 -cpu Haswell) and compares.
INT8_TYPES = {
    ("onnx", "static"): {"activations": "uint8", "weights": "uint8"},
    ("onnx", "dynamic"): {"activations": "uint8, quantized at run time", "weights": "uint8"},
    ("tflite", "static"): {"activations": "int8", "weights": "int8"},
    ("tflite", "dynamic"): {"activations": "float32 (int8 at run time in hybrid kernels)",
                            "weights": "int8"},
}


def _quantize_onnx(proto, half: str, method: str, calibration: np.ndarray, folder: Path):
    """int8 ONNX (U8U8, see INT8_TYPES): `static` (QDQ, calibrated) or `dynamic` (weights uint8,
    activations at run time)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quant_pre_process, quantize_dynamic, quantize_static)

    src = folder / f"{half}.fp32.onnx"
    pre = folder / f"{half}.pre.onnx"
    dst = folder / f"{half}.{method}.onnx"
    onnx.save(proto, src)
    with _quiet():
        quant_pre_process(src, pre, skip_symbolic_shape=False)
        if method == "static":
            reader = type("Reader", (_Reader, CalibrationDataReader), {})(INPUT[half], calibration)
            quantize_static(pre, dst, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8)
        else:
            quantize_dynamic(pre, dst, weight_type=QuantType.QUInt8, per_channel=False)
    return onnx.load(dst)


def _finish_onnx(proto, run: Run, half: str, precision: str, method: str | None = None):
    """Sets metadata_props, producer and doc string on a finished model."""
    values = metadata(run, half, precision)
    if method:
        values["quantization"] = method
    set_onnx_metadata(proto, values)
    proto.producer_name = "kvae"
    from kvae import __version__

    proto.producer_version = __version__
    proto.doc_string = (f"kvae {half} ({precision}): " +
                        ("x (batch, H, W, C) in [0, 1] -> loc, scale (batch, latent_dim)"
                         if half == "encoder" else "z (batch, latent_dim) -> x_mean (batch, H, W, C)"))
    return proto


def _check_onnx(path: Path, run: Run, half: str, precision: str, name: str) -> dict:
    """onnx.checker (full) then onnxruntime vs Keras, at batch 64 and batch 1."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise KVAEError(f"{name}: self-check failed: onnx.checker: "
                        f"{str(e).strip().splitlines()[0][:300]}") from None
    inputs = run.parity_inputs(half)
    reference = run.keras_outputs(half, inputs)
    try:
        runner = ORTRunner(path)
        results = [_batches(runner, INPUT[half], inputs, None), _batches(runner, INPUT[half], inputs, 1)]
    except Exception as e:
        raise KVAEError(f"{name}: self-check failed: onnxruntime cannot run it: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from None
    return parity(half, precision, reference, results, name)


def export_onnx(run: str | Path | Run, out: str | Path | None = None,
                quantize: tuple[str, ...] = QUANTIZED, int8: str = "best") -> dict:
    """Writes encoder/decoder .onnx files (float32 and `quantize` variants) and their manifest.

    int8 (`best`): static QDQ and dynamic quantization are both built and measured; the one with
    the lower NLL change on the selection images is written, and the manifest records both under
    "int8_candidates".

    Args:
      run: a run folder (or a loaded Run).
      out: output folder (default RUN/export).
      quantize: quantized variants besides float32: any of `fp16`, `int8`.
      int8: `static` (QDQ, calibrated), `dynamic` or `best` (both; see _best_int8).

    Returns:
      The manifest (dict) after merging this export's entries.

    Raises:
      KVAEError: bad run, failed conversion, or a file that failed its self-check.
    """
    import onnx

    _methods(int8)  # a bad value fails before any work
    run = run if isinstance(run, Run) else load_run(run)
    protos = {}

    def write(half: str, precision: str, path: Path, tmp: Path) -> dict:
        if half not in protos:
            protos[half] = _onnx_model(run, half).SerializeToString()
        fp32 = onnx.ModelProto.FromString(protos[half])
        extra = {}
        if precision == "fp32":
            proto = fp32
        elif precision == "fp16":
            proto = fp16_weights(fp32)
        else:
            calibration = run.x_calibration if half == "encoder" else run.z_calibration
            proto, extra = _onnx_int8(fp32, run, half, calibration, tmp, int8)
        proto = _finish_onnx(proto, run, half, precision, extra.get("quantization"))
        with _written(path, proto.SerializeToString()) as written:
            check = _check_onnx(written, run, half, precision, path.name)
            if precision == "fp16":
                extra = _nll_of_file(run, half, ORTRunner(written), 256)
            return _entry(written, run, half, "onnx", precision, check, batch="dynamic", **extra)

    return _export_all(run, out, "onnx", quantize, write)


def _methods(int8: str) -> tuple[str, ...]:
    """The int8 methods to build for --int8 (`best`: both)."""
    if int8 not in INT8_METHODS:
        raise KVAEError(f"--int8 must be one of {', '.join(INT8_METHODS)}, got {int8!r}")
    return ("static", "dynamic") if int8 == "best" else (int8,)


def _onnx_int8(fp32, run: Run, half: str, calibration: np.ndarray, folder: Path,
               int8: str = "best") -> tuple:
    """Static-QDQ and dynamic int8 candidates, one kept by `_best_int8`."""

    def build(method: str):
        proto = _quantize_onnx(fp32, half, method, calibration, folder)
        path = folder / f"{half}.{method}.checked.onnx"
        data = proto.SerializeToString()
        path.write_bytes(data)
        return proto, len(data), lambda images: _nll_of_file(run, half, ORTRunner(path), 256, images,
                                                             p_range=iwae.p_range("int8", method))

    proto, extra = _best_int8("ONNX", half, int8, build)
    return proto, {**extra, "int8_types": INT8_TYPES["onnx", extra["quantization"]]}


def _best_int8(fmt: str, half: str, int8: str, build: Callable[[str], tuple]) -> tuple:
    """Builds the int8 candidates `int8` asks for and keeps the one with the lower NLL change on
    the selection images (training images); the held-out nll_delta of each is reported, not used.

    Args:
      build: build(method) -> (model, size in bytes, nll(images) -> NLL entry); it may raise,
        e.g. where a converter cannot quantize an op: that candidate is then recorded with its
        error (and said on stdout), and the other one is kept.

    Returns:
      (model, manifest fields: quantization, int8_candidates, int8_selection, nll_delta, nll).

    Raises:
      KVAEError: every candidate failed (each one's error in the message).
    """
    candidates = {}
    for method in _methods(int8):
        try:
            model, size, nll = build(method)
            selection, held_out = nll("selection"), nll("held_out")
        except Exception as e:  # one method may not support an op; the other may
            candidates[method] = {"error": f"{type(e).__name__}: {str(e).strip()[:200]}"}
            log(f"kvae.export: {fmt} int8 ({method}) of the {half} failed: "
                f"{candidates[method]['error'].splitlines()[0]}")
            continue
        candidates[method] = {"model": model, "size": size, "selection": selection, **held_out}
    ok = {m: c for m, c in candidates.items() if "model" in c}
    if not ok:
        raise KVAEError(f"{fmt} int8 quantization of the {half} failed: " +
                        "; ".join(f"{m}: {c['error']}" for m, c in candidates.items()))
    method = min(ok, key=lambda m: ok[m]["selection"]["nll_delta"])
    summary = {m: ({"selection_nll_delta": c["selection"]["nll_delta"], "nll_delta": c["nll_delta"],
                    "size": c["size"]} if "model" in c else {"error": c["error"]})
               for m, c in candidates.items()}
    chosen = ok[method]
    selection = chosen["selection"]["nll"]
    return chosen["model"], {
        "quantization": method, "int8_candidates": summary,
        "int8_selection": (f"the lower selection_nll_delta: {selection['inputs']}, n={selection['n']}, "
                           f"k={selection['k']}; nll_delta is measured on other images"),
        "nll_delta": chosen["nll_delta"], "nll": chosen["nll"]}
