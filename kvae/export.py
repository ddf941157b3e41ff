"""Export a run's encoder and decoder, each file checked before it gets its final name.

    python export/to_tflite.py RUN [--quantize fp16 int8] [--int8 best] [--fixed-batch 1]
    python export/to_onnx.py RUN [--quantize fp16 int8] [--int8 best]

Writes into RUN/export/ the files and the manifest of kvae.contract (docs/design.md, "The export
contract"): `<half>[.<precision>].<format>` for both halves, float32 plus fp16 and int8, and
`manifest.json` with one entry per file. What is shared by both formats lives here: the run
loaded for export with every check's inputs (`Run`, `load_run`), the metadata and manifest
entries, writing under a temporary name (`_written`) and the loop over halves and precisions
(`_export_all`). The formats: kvae.export_tflite and kvae.export_onnx; the checks every file
passes: kvae.export_checks (through kvae.sessions, the runtime's own session code). How the
files are made and what the checks measure: docs/export.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from kvae import iwae, runs
from kvae import prior as kprior
from kvae.contract import (CONDITION, HALVES, INPUT, OUTPUTS, PRIOR, PRIOR_ENTRY, QUANTIZED, filename,
                           inputs, sha256, update_manifest)
from kvae.errors import KVAEError, describe_os_error
from kvae.files import atomic_path, remove_stale_temps

PIXEL_RANGE = "[0, 1]"
INT8_METHODS = ("best", "static", "dynamic")  # --int8: `best` builds both and keeps one (kvae.export_checks)

PARITY_N = 64  # validation images (and z) compared with Keras, in one call and one by one
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
      conditions: a conditional model's one-hot y for each of the sets above, by the set's name
        ("x_parity", "z_parity", ...): an image's own label, and for z ~ N(0, I) classes in
        turn; None for an unconditional model.
      class_names: the classes of a conditional model (index = class id).
      prior: the run's sampling prior (RUN/prior.json, kvae.prior), or None; when it is the
        model's learned P(z) (`model_prior`), z "from the prior" above are drawn from it and
        every NLL uses it.
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
    conditions: dict | None = None
    class_names: tuple[str, ...] | None = None
    prior: dict | None = None
    _nll_fp32: dict = dataclasses.field(default_factory=dict)
    _keras_decode: Callable | None = None

    @property
    def latent_dim(self) -> int:
        return int(self.decoder.inputs[0].shape[-1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.encoder.inputs[0].shape[1:])

    @property
    def num_classes(self) -> int:
        """The condition's size (0: unconditional)."""
        return int(self.encoder.inputs[1].shape[-1]) if len(self.encoder.inputs) > 1 else 0

    @property
    def likelihood(self) -> str:
        return self.config.likelihood

    @property
    def model_prior(self) -> dict | None:
        """The model's learned P(z) (kvae.prior), or None: N(0, I)."""
        return kprior.model_prior(self.prior)

    @property
    def sigma(self) -> float:
        return float(self.config.sigma)

    def input_names(self, half: str) -> tuple[str, ...]:
        return inputs(half, bool(self.num_classes))

    def keras_outputs(self, half: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Float32 Keras outputs by contract name, for inputs by contract name."""
        args = [feeds[name] for name in self.input_names(half)]
        args = args if len(args) > 1 else args[0]
        if half == "encoder":
            loc, scale = self.encoder(args, training=False)
            return {"loc": np.asarray(loc), "scale": np.asarray(scale)}
        return {"x_mean": np.asarray(self.decoder(args, training=False))}

    def feeds(self, half: str, which: str = "parity") -> dict[str, np.ndarray]:
        """The `parity` or `calibration` inputs of a half by contract name (y too if conditional)."""
        name = f"{'x' if half == 'encoder' else 'z'}_{which}"
        feeds = {INPUT[half]: getattr(self, name)}
        if self.conditions is not None:
            feeds[CONDITION] = self.conditions[name]
        return feeds

    def parity_description(self, half: str) -> str:
        n = len(self.x_parity)
        if half == "encoder":
            text = f"{n} validation {self.dataset} images ({self.preprocessing_short()})"
            y = "; y their labels" if self.num_classes else ""
        else:
            prior = "P(z) (the learned prior)" if self.model_prior is not None else "N(0, I)"
            text = f"{n} z ~ {prior} and {n} z ~ Q(z|X) of validation {self.dataset} images"
            y = "; y the classes in turn, then the images' labels" if self.num_classes else ""
        return f"{text}, at batch {n} and batch 1{y}"

    def preprocessing_short(self) -> str:
        mode = self.config.resolved_binarize
        return "binarized with a fixed seed" if mode == "dynamic" else (
            "binarized at 0.5" if mode == "static" else "pixels / 255")

    def nll_images(self, images: str) -> tuple:
        """(x, loc, scale, eps, y) of `held_out` (what nll_delta reports) or `selection` images;
        y is None for an unconditional model."""
        if images == "held_out":
            return (self.x_nll, self.loc_nll, self.scale_nll, self.eps_nll,
                    None if self.conditions is None else self.conditions["x_nll"])
        return (self.x_select, self.loc_select, self.scale_select, self.eps_select,
                None if self.conditions is None else self.conditions["x_select"])

    def nll_fp32(self, images: str = "held_out") -> np.ndarray:
        """Per-image NLL with the float32 Keras decoder on `images` (computed once)."""
        if images not in self._nll_fp32:
            x, loc, scale, eps, y = self.nll_images(images)
            self._nll_fp32[images] = iwae.nll(x, loc, scale, eps, self.keras_decode(),
                                              self.likelihood, self.sigma, y=y, prior=self.model_prior)
        return self._nll_fp32[images]

    def keras_decode(self) -> Callable:
        if self._keras_decode is None:
            self._keras_decode = keras_decode(self.decoder)
        return self._keras_decode


def load_run(run: str | Path) -> Run:
    """Loads RUN's Keras halves, config and data, and draws every check's inputs (seeded).

    Raises:
      KVAEError: RUN is not a finished run folder, or its files or dataset cannot be read.
    """
    from kvae import data as kdata

    run = runs.check_run(run, needs=tuple(f"{half}.keras" for half in HALVES))
    config = runs.read_config(run)
    data = kdata.load(config.dataset, config.data_dir, config.val_size, image_size=config.image_size)
    models = {half: runs.load_keras(run / f"{half}.keras") for half in HALVES}
    encoder, decoder = models["encoder"], models["decoder"]
    image_shape = tuple(int(d) for d in encoder.inputs[0].shape[1:])
    if data.image_shape != image_shape:
        raise KVAEError(f"{config.dataset} images are {data.image_shape}, the model takes {image_shape}")
    latent_dim = int(decoder.inputs[0].shape[-1])
    conditional = len(encoder.inputs) > 1
    trained = runs.read_metrics(run).get("classes")
    if conditional and (int(encoder.inputs[1].shape[-1]) != data.num_classes or (
            trained is not None and list(data.class_names) != list(trained))):
        raise KVAEError(f"{config.dataset} has the classes {list(data.class_names or ())}, the "
                        f"conditional model was trained on {trained or int(encoder.inputs[1].shape[-1])}")
    y_val = kdata.one_hot(data.labels("val"), data.num_classes) if conditional else None
    y_train = kdata.one_hot(data.labels("train"), data.num_classes) if conditional else None

    def encode(x, y):
        return encoder(x if y is None else [x, y], training=False)

    mode = config.resolved_binarize
    rng = np.random.default_rng(NLL_SEED)
    x_val = kdata.binarize_fixed(data.x_val, mode)  # as kvae.evaluate sees held-out data
    x_parity = x_val[:PARITY_N]
    x_nll = x_val[:NLL_N]
    x_calibration = kdata.binarize_fixed(data.x_train[:CALIBRATION_N], mode, seed=kdata.EVAL_SEED + 1)

    def posterior_sample(x, y=None):
        loc, scale = (np.asarray(t) for t in encode(x, y))
        return loc, scale, (loc + scale * rng.standard_normal(loc.shape)).astype(np.float32)

    def rows(y, n):
        return None if y is None else y[:n]

    fitted = read_prior(run, latent_dim)
    model_prior = kprior.model_prior(fitted)
    if config.resolved_prior_mixture and model_prior is None:  # every NLL and check needs its P(z)
        raise KVAEError(f"{run} learned its prior P(z) (--prior-mixture {config.resolved_prior_mixture}) "
                        f"but {run / PRIOR} is missing or is not that prior: python -m kvae.fit --resume "
                        f"--out {run} writes it again")

    def prior_sample(n):  # z ~ P(z): N(0, I), or the model's learned prior
        eps = rng.standard_normal((n, latent_dim)).astype(np.float32)
        return eps if model_prior is None else kprior.sample(model_prior, eps, rng)

    _, _, z_post = posterior_sample(x_parity, rows(y_val, PARITY_N))
    z_parity = np.concatenate([prior_sample(len(x_parity)), z_post])
    _, _, z_cal = posterior_sample(x_calibration, rows(y_train, CALIBRATION_N))
    z_calibration = np.concatenate([prior_sample(len(x_calibration)), z_cal])
    loc_nll, scale_nll, _ = posterior_sample(x_nll, rows(y_val, NLL_N))
    eps_nll = np.random.default_rng(NLL_SEED + 1).standard_normal(
        (NLL_K, len(x_nll), latent_dim)).astype(np.float32)
    select = slice(CALIBRATION_N, CALIBRATION_N + NLL_N)
    select_source = "training images not used for calibration"
    if len(range(len(data.x_train))[select]) < 2:  # a tiny training set: only calibration images
        select, select_source = slice(0, NLL_N), "training images (also the calibration ones)"
    x_select = data.x_train[select]
    y_select = None if y_train is None else y_train[select]
    x_select = kdata.binarize_fixed(np.asarray(x_select), mode, seed=kdata.EVAL_SEED + 2)
    loc_select, scale_select = (np.asarray(t) for t in encode(x_select, y_select))
    eps_select = np.random.default_rng(NLL_SEED + 2).standard_normal(
        (NLL_K, len(x_select), latent_dim)).astype(np.float32)
    conditions = None
    if conditional:  # z from the prior: the classes in turn; z from a posterior: its image's class
        turns = kdata.one_hot(np.arange(max(len(x_parity), len(x_calibration))) % data.num_classes,
                              data.num_classes)
        conditions = {"x_parity": y_val[:PARITY_N], "x_nll": y_val[:NLL_N],
                      "z_parity": np.concatenate([turns[:len(x_parity)], y_val[:PARITY_N]]),
                      "x_calibration": y_train[:CALIBRATION_N],
                      "z_calibration": np.concatenate([turns[:len(x_calibration)],
                                                       y_train[:CALIBRATION_N]]),
                      "x_select": y_select}
    return Run(run, config, encoder, decoder, x_parity, z_parity, x_nll, loc_nll, scale_nll,
               eps_nll, x_calibration, z_calibration, config.dataset, x_select, loc_select,
               scale_select, eps_select, select_source, conditions,
               data.class_names if conditional else None, fitted)


def read_prior(run: Path, latent_dim: int) -> dict | None:
    """RUN/prior.json (checked), or None if the run has none."""
    from kvae import prior

    if not (run / PRIOR).exists():
        return None
    again = f"python -m kvae.fit --resume --out {run} fits it again (or delete it to export without one)"
    try:
        fitted = prior.read(run / PRIOR, latent_dim)
    except ValueError as e:
        raise KVAEError(f"{e}: {again}") from None
    source = fitted.get("source", {}).get("encoder.keras")
    if source is not None and source != sha256(run / "encoder.keras"):
        raise KVAEError(f"{run / PRIOR} was fitted to another training of this run (its encoder.keras "
                        f"differs): {again}")
    return fitted


def keras_decode(decoder) -> Callable:
    """A numpy decode function around a Keras decoder, traced once (tf.function): decode(z), or
    decode(z, y) for a conditional decoder."""
    import tensorflow as tf

    if len(decoder.inputs) > 1:
        fn = tf.function(lambda z, y: decoder([z, y], training=False), reduce_retracing=True)
        return lambda z, y: fn(tf.constant(z), tf.constant(y)).numpy()
    fn = tf.function(lambda z: decoder(z, training=False), reduce_retracing=True)
    return lambda z: fn(tf.constant(z)).numpy()


@contextlib.contextmanager
def quiet():
    """Sends the converters' and runtimes' C++ chatter on stdout/stderr (fd level) to a file;
    replays it on error."""
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


# ----------------------------------------------------------------------------------------------
# Writing, manifest and metadata


def io_spec(run: Run, half: str) -> tuple[list[dict], list[dict]]:
    d, image = run.latent_dim, list(run.image_shape)
    shapes = {"x": image, "z": [d], "loc": [d], "scale": [d], "x_mean": image}
    inputs = [{"name": INPUT[half], "shape": ["batch", *shapes[INPUT[half]]], "dtype": "float32"}]
    outputs = [{"name": n, "shape": ["batch", *shapes[n]], "dtype": "float32"} for n in OUTPUTS[half]]
    if run.num_classes:
        inputs.append({"name": CONDITION, "shape": ["batch", run.num_classes], "dtype": "float32"})
    return inputs, outputs


def metadata(run: Run, half: str, precision: str) -> dict[str, str]:
    """Key-value metadata stored inside each file (ONNX metadata_props; TFLite `kvae` buffer)."""
    from kvae import __version__

    values = {"kvae_version": __version__, "half": half, "precision": precision,
              "latent_dim": str(run.latent_dim), "image_shape": json.dumps(list(run.image_shape)),
              "likelihood": run.likelihood, "sigma": repr(run.sigma), "pixel_range": PIXEL_RANGE}
    if run.num_classes:
        values["classes"] = json.dumps(list(run.class_names))
    return values


def preprocessing(run: Run) -> str:
    mode = run.config.resolved_binarize
    text = ("x: float32 (batch, H, W, C), channels last, pixel values in [0, 1] (uint8 / 255). ")
    if mode == "dynamic":
        text += ("The model was trained on binarized pixels (each pixel 1 with probability x); "
                 "the export's checks use validation x binarized with a fixed seed. ")
    elif mode == "static":
        text += "The model was trained on pixels binarized at 0.5 (x > 0.5). "
    prior = ("the model's learned prior P(z) in prior.json (a Gaussian mixture)"
             if run.model_prior is not None else "N(0, I)")
    text += (f"z: float32 (batch, latent_dim); sample z ~ {prior}, or z = loc + scale * eps with "
             "eps ~ N(0, I), with the host's random numbers (no random ops in the files). "
             f"x_mean: float32 in [0, 1], the {run.likelihood} mean of P(X|z).")
    if run.num_classes:
        text = text.replace("mean of P(X|z).", "mean of P(X|z, y).") + (
            f" y: float32 (batch, {run.num_classes}), the one-hot class label (index = position in "
            "the manifest's classes); both halves take it.")
    return text


def manifest_header(run: Run) -> dict:
    from kvae import __version__

    header = {"kvae_version": __version__, "latent_dim": run.latent_dim,
              "image_shape": list(run.image_shape), "likelihood": run.likelihood, "sigma": run.sigma,
              "preprocessing": preprocessing(run),
              "source": {name: sha256(run.path / name) for name in ("encoder.keras", "decoder.keras")}}
    if run.num_classes:
        header.update(conditional=True, classes=list(run.class_names))
    if run.prior is not None:
        header[PRIOR_ENTRY] = {"file": PRIOR, "sha256": sha256(run.path / PRIOR),
                               "components": len(run.prior["weights"])}
    return header


def file_entry(path: Path, run: Run, half: str, fmt: str, precision: str, check: dict, **extra) -> dict:
    inputs, outputs = io_spec(run, half)
    entry = {"half": half, "format": fmt, "precision": precision, "sha256": sha256(path),
             "size": path.stat().st_size, "inputs": inputs, "outputs": outputs}
    entry.update(extra)
    entry["parity"] = {**check, "inputs": run.parity_description(half)}
    return entry


@contextlib.contextmanager
def written_file(path: Path, data: bytes):
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


def export_all(run: Run, out, fmt: str, quantize, write: Callable) -> dict:
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
                if entries:  # the prior goes with files that passed, never alone
                    copy_prior(run, out)
                update_manifest(out, header, entries, removed=(name,))
    try:  # last, next to the manifest that names it: the old manifest and prior stay a pair till then
        copy_prior(run, out)
    except OSError as e:
        raise KVAEError(f"cannot write to {out}: {describe_os_error(e)}") from None
    return update_manifest(out, header, entries)


def copy_prior(run: Run, out: Path) -> None:
    """The run's sampling prior next to the exported files (or none there if the run has none)."""
    if run.prior is None:
        (out / PRIOR).unlink(missing_ok=True)
        return
    data = (run.path / PRIOR).read_bytes()
    if not (out / PRIOR).exists() or (out / PRIOR).read_bytes() != data:
        with written_file(out / PRIOR, data):
            pass


def _summary(name: str, entry: dict, seconds: float) -> str:
    diff = ", ".join(f"{k} {v:.2g}" for k, v in entry["parity"]["max_abs_diff"].items())
    text = f"kvae.export: wrote {name} ({entry['size'] / 1e6:.2f} MB): max abs diff vs Keras {diff}"
    if "nll_delta" in entry:
        text += f"; validation NLL {entry['nll_delta']:+.3f} nats vs float32"
    return text + f" [{seconds:.1f} s]"


