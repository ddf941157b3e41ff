"""TensorFlow-free inference on the exported halves: numpy plus onnxruntime or LiteRT.

    pip install numpy onnxruntime pillow        # or: pip install numpy ai-edge-litert pillow

    from kvae.runtime import VAE
    vae = VAE.from_folder("runs/quickstart")    # RUN/export/{encoder,decoder}.onnx
    images = vae.sample(16, seed=0)             # (16, 28, 28, 1) in [0, 1]
    loc, scale = vae.encode(images)             # (16, latent_dim) each

The format follows the file's extension (`.onnx` -> onnxruntime, `.tflite` -> LiteRT); the
runtime module is imported only when a file of its format is opened. latent_dim, image shape and
likelihood come from `manifest.json` beside the file (written by the export scripts), else from
the ONNX file's metadata, else from the model's input and output shapes.

Sampling draws eps ~ N(0, I) on the host with numpy's Generator and feeds it as z: a seed gives
the same images in every process, no seed gives new ones. (Random ops inside the exported graph
replay one sequence per onnxruntime session and cannot take a seed: see the README.)

Nothing here imports TensorFlow, and `import kvae.runtime` imports only numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvae import contract, iwae, sessions
from kvae.sessions import RuntimeInputError, Session, first_line, manifest_entry, resolve

SIGNATURES = {half: ((contract.INPUT[half],), contract.OUTPUTS[half]) for half in contract.HALVES}


# --------------------------------------------------------------------------- the two halves


class _Half:
    """Shared by Encoder and Decoder: opens the file, checks its signature, reads its metadata."""

    half = ""

    def __init__(self, path: str | Path, threads: int | None = None, xnnpack: bool = True,
                 verify: bool = False, max_batch: int = 256, prefer_fixed: bool | None = None,
                 likelihood: str | None = None, sigma: float | None = None):
        path = resolve(path, self.half)
        manifest, entry = manifest_entry(path)
        if verify:
            sessions.verify(path, entry)
        if prefer_fixed is None:  # Conv2DTranspose (decoder) needs fixed shapes under XNNPACK
            prefer_fixed = self.half == "decoder" and xnnpack
        self.session = Session(path, threads=threads, xnnpack=xnnpack, max_batch=max_batch,
                                prefer_fixed=prefer_fixed)
        self.path = path
        inputs, outputs = SIGNATURES[self.half]
        found_in, found_out = tuple(self.session.inputs), tuple(self.session.outputs)
        if set(found_in) != set(inputs) or set(found_out) != set(outputs):
            other = "encoder" if self.half == "decoder" else "decoder"
            if (set(found_in), set(found_out)) == tuple(set(s) for s in SIGNATURES[other]):
                raise RuntimeInputError(f"{path} is the {other}, not the {self.half}; open it with "
                                        f"kvae.runtime.{other.capitalize()}")
            raise RuntimeInputError(
                f"{path} is not a kvae {self.half}: it has inputs {list(found_in)} and outputs "
                f"{list(found_out)}; expected {list(inputs)} -> {list(outputs)} (export/to_onnx.py, "
                "export/to_tflite.py)")
        meta = {} if manifest else self.session.read_metadata()
        self.info = _describe(manifest, entry, meta, self.session, self.half)
        if likelihood is not None:
            self.info["likelihood"] = likelihood
        if sigma is not None:
            self.info["sigma"] = float(sigma)
        self.latent_dim: int = self.info["latent_dim"]
        self.image_shape: tuple[int, int, int] = tuple(self.info["image_shape"])

    @property
    def format(self) -> str:
        return self.session.format

    def __repr__(self):
        return (f"{type(self).__name__}({str(self.path)!r}, format={self.format!r}, "
                f"latent_dim={self.latent_dim}, image_shape={self.image_shape})")


def _describe(manifest: dict, entry: dict | None, meta: dict, session: Session, half: str) -> dict:
    """latent_dim, image_shape, likelihood, sigma, precision and where they came from."""
    if manifest:
        source = "manifest.json"
        info = {key: manifest.get(key) for key in ("latent_dim", "image_shape", "likelihood", "sigma")}
        info["precision"] = (entry or {}).get("precision", "fp32")
        info["quantization"] = (entry or {}).get("quantization")
    elif "latent_dim" in meta:
        source = f"{session.format.upper() if session.format == 'onnx' else 'TFLite'} metadata"
        try:
            info = {"latent_dim": int(meta["latent_dim"]),
                    "image_shape": json.loads(meta.get("image_shape", "null")),
                    "likelihood": meta.get("likelihood"),
                    "sigma": float(meta["sigma"]) if meta.get("sigma") not in (None, "", "None") else None,
                    "precision": meta.get("precision", "fp32"),
                    "quantization": meta.get("quantization")}
        except (ValueError, TypeError) as e:
            raise RuntimeInputError(f"{session.path}: unreadable kvae metadata: {e}") from None
    else:
        source = "model shapes"
        info = {"latent_dim": None, "image_shape": None, "likelihood": None, "sigma": None,
                "precision": "fp32", "quantization": None}
    # the model's own shapes fill gaps and must agree with the metadata
    if half == "decoder":
        latent = session.inputs["z"][0][-1]
        image = session.outputs["x_mean"][0][1:]
    else:
        latent = session.outputs["loc"][0][-1]
        image = session.inputs["x"][0][1:]
    if info["latent_dim"] is None:
        info["latent_dim"] = latent
    if not info["image_shape"]:
        info["image_shape"] = list(image)
    shape = info["image_shape"]
    if info["latent_dim"] is None or not isinstance(shape, (list, tuple)) or len(shape) != 3 or None in shape:
        raise RuntimeInputError(f"{session.path}: cannot tell the latent size and image shape (no "
                                "manifest.json beside it and no metadata in it)")
    try:
        info["latent_dim"] = int(info["latent_dim"])
        info["image_shape"] = [int(d) for d in info["image_shape"]]
    except (TypeError, ValueError):
        raise RuntimeInputError(f"{session.path}: its {source} gives latent_dim "
                                f"{info['latent_dim']!r} and image_shape {info['image_shape']!r}") from None
    if latent is not None and latent != info["latent_dim"] or (
            None not in image and list(image) != info["image_shape"]):
        raise RuntimeInputError(f"{session.path} takes latent size {latent} and images {list(image)} "
                                f"but its {source} says {info['latent_dim']} and {info['image_shape']}: "
                                "the file and its manifest are from different exports: export the run again")
    info["source"] = source
    return info


class Decoder(_Half):
    """z (B, latent_dim) -> x_mean (B, H, W, C) from an exported decoder file.

    Args:
      path: `decoder*.onnx` / `decoder*.tflite`, or an export or run folder (opens decoder.onnx,
        else decoder.tflite).
      threads: CPU threads (None: the runtime's default).
      xnnpack: TFLite only: use the XNNPACK delegate (default on).
      verify: check the file's sha256 against manifest.json before opening it.
      max_batch: rows per runtime call (larger batches are chunked).
      prefer_fixed: TFLite files with fixed-batch signatures (`batch1`, the exporter's fast path):
        feed rows through them (row by row for `batch1`) rather than the dynamic signature.
        Default: on for the decoder under XNNPACK (it cannot run a Conv2DTranspose with a
        run-time batch; bench/latency.py times both signatures), off for the encoder (Conv2D
        runs as fast either way). A batch of exactly N always uses `batch<N>`.
      likelihood, sigma: override the manifest's (needed for log_likelihood without a manifest).

    Raises:
      RuntimeInputError: missing, truncated, corrupt or non-model file, or not a kvae decoder.
    """

    half = "decoder"

    def decode(self, z) -> np.ndarray:
        """z (B, latent_dim) or (latent_dim,) -> x_mean (B, H, W, C) or (H, W, C), float32 in [0, 1]."""
        z = _array(z, "z")
        single = z.ndim == 1
        z = check_latents(z if not single else z[None], self.latent_dim)
        if len(z) == 0:
            return np.zeros((0, *self.image_shape), np.float32)
        x_mean = self.session.run(z=z)["x_mean"]
        _check_output(x_mean, "x_mean", self.path, f"for z up to |{float(np.abs(z).max()):.3g}|",
                      "keep z to moderate values (the prior is N(0, I)); if they are, the file is "
                      "broken: export it again")
        return x_mean[0] if single else x_mean

    @property
    def p_range(self) -> tuple[float, float]:
        """The probabilities a Bernoulli log-likelihood clips x_mean to: this file's resolution
        (kvae.iwae's clip rule; an int8 file that is not dynamic-range quantized outputs an
        int8 grid)."""
        return iwae.p_range(self.info.get("precision", "fp32"), self.info.get("quantization"))

    def sample(self, n: int, seed=None) -> np.ndarray:
        """n images from the prior: z = eps ~ N(0, I) drawn by numpy, then decoded.

        Args:
          n: number of images.
          seed: int or numpy Generator; the same seed gives the same images in any process.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise RuntimeInputError(f"n must be a non-negative integer, got {n!r}")
        return self.decode(draw_eps(seed, (int(n), self.latent_dim)))


class Encoder(_Half):
    """x (B, H, W, C) in [0, 1] -> (loc, scale) of Q(z|X) from an exported encoder file.

    Same arguments as `Decoder`; a folder opens encoder.onnx, else encoder.tflite.
    """

    half = "encoder"

    def encode(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (loc, scale), each (B, latent_dim), or (latent_dim,) for one image.

        Args:
          x: (B, H, W, C) or one (H, W, C) image (for one channel also (B, H, W) / (H, W));
            floats in [0, 1], or integers 0..255 (uint8 images as read from files).
        """
        x, single = check_images(x, self.image_shape)
        if len(x) == 0:
            empty = np.zeros((0, self.latent_dim), np.float32)
            return empty, empty.copy()
        out = self.session.run(x=x)
        loc, scale = out["loc"], out["scale"]
        _check_output(np.concatenate([loc, scale]), "loc, scale", self.path, "for images in [0, 1]",
                      "the file is broken: export it again")
        return (loc[0], scale[0]) if single else (loc, scale)


# --------------------------------------------------------------------------- input checks


def _check_output(values: np.ndarray, what: str, path: Path, context: str, advice: str) -> None:
    """NaN or inf out of a model (z near the float32 limit, or a broken file) is an error, never
    a silent result."""
    if not np.all(np.isfinite(values)):
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise RuntimeInputError(f"{path} gave {bad} NaN or infinite value(s) of {what} {context}: "
                                f"{advice}")


def draw_eps(seed, shape) -> np.ndarray:
    """eps ~ N(0, I) as float32 from numpy's Generator (seed: int, Generator or None)."""
    return _rng(seed).standard_normal(shape, dtype=np.float32)


def _rng(seed) -> np.random.Generator:
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError):  # numpy's message may quote the seed itself, newlines and all
        raise RuntimeInputError("seed must be a non-negative integer or a numpy Generator, got "
                                f"{_first_line_repr(seed)}") from None


def _first_line_repr(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: one line (repr escapes newlines) for any input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _array(value, what: str) -> np.ndarray:
    """np.asarray, with ragged or unconvertible input turned into a RuntimeInputError."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:  # e.g. rows of different lengths
        raise RuntimeInputError(f"{what} must be an array of numbers with rows of equal length: "
                                f"{first_line(e)}") from None


def _as_float32(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.kind not in "fiub":
        raise RuntimeInputError(f"{what} must be a real numeric array; got dtype {a.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise RuntimeInputError(f"{what} has {bad} NaN or infinite value(s) (or values too large "
                                "for float32)")
    return a


def check_latents(z, latent_dim: int) -> np.ndarray:
    """z -> float32 (B, latent_dim), or a RuntimeInputError that says what is wrong."""
    z = _array(z, "z")
    if z.ndim != 2 or z.shape[1] != latent_dim:
        raise RuntimeInputError(f"z must have shape (batch, {latent_dim}) (this decoder's latent size "
                                f"is {latent_dim}); got {z.shape}")
    return _as_float32(z, "z")


def check_images(x, image_shape) -> tuple[np.ndarray, bool]:
    """Images -> (float32 (B, H, W, C) in [0, 1], whether one image was given)."""
    x = _array(x, "images")
    h, w, c = image_shape
    single = False
    if x.shape == (h, w, c):
        x, single = x[None], True
    elif c == 1 and x.shape == (h, w):
        x, single = x[None, ..., None], True
    elif c == 1 and x.ndim == 3 and x.shape[1:] == (h, w):
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (h, w, c):
        raise RuntimeInputError(f"images must have shape (batch, {h}, {w}, {c}) or ({h}, {w}, {c}); "
                                f"got {x.shape}")
    if x.dtype.kind in "iu":  # integer pixels: 0..255 levels
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise RuntimeInputError(f"integer images must hold 0..255; got values in [{lo}, {hi}]")
        return x.astype(np.float32) / 255.0, single
    x = _as_float32(x, "images")
    if x.size:
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise RuntimeInputError(f"float images must lie in [0, 1]; got values in [{lo:g}, {hi:g}] "
                                    "(divide 0..255 pixels by 255, or pass uint8)")
    return x, single


# --------------------------------------------------------------------------- the pair


class VAE:
    """An exported encoder and decoder used together (no TensorFlow).

    Args:
      encoder_path, decoder_path: the two files (any mix of `.onnx` / `.tflite`).
      **options: `threads`, `xnnpack`, `verify`, `max_batch`, `likelihood`, `sigma` for both.
    """

    def __init__(self, encoder_path, decoder_path, **options):
        self.encoder = Encoder(encoder_path, **options)
        self.decoder = Decoder(decoder_path, **options)
        if (self.encoder.latent_dim, self.encoder.image_shape) != (self.decoder.latent_dim,
                                                                    self.decoder.image_shape):
            raise RuntimeInputError(
                f"{self.encoder.path} (latent {self.encoder.latent_dim}, images "
                f"{list(self.encoder.image_shape)}) and {self.decoder.path} (latent "
                f"{self.decoder.latent_dim}, images {list(self.decoder.image_shape)}) do not belong together")
        self.latent_dim = self.decoder.latent_dim
        self.image_shape = self.decoder.image_shape

    @classmethod
    def from_folder(cls, folder, format: str | None = None, precision: str = "fp32",
                    encoder_precision: str = "fp32", **options) -> "VAE":
        """Opens RUN/export/ (or an export folder): encoder.<fmt> and decoder[.<precision>].<fmt>.

        Args:
          folder: run folder or export folder.
          format: `onnx` or `tflite` (default: onnx when present, else tflite).
          precision: the decoder's: `fp32`, `fp16` or `int8`.
          encoder_precision: the encoder's.
        """
        if format not in (None, "onnx", "tflite"):
            raise RuntimeInputError(f"format must be 'onnx' or 'tflite', got {format!r}")
        return cls(resolve(folder, "encoder", format, encoder_precision),
                   resolve(folder, "decoder", format, precision), **options)

    @property
    def likelihood(self) -> str | None:
        return self.decoder.info.get("likelihood")

    @property
    def sigma(self) -> float | None:
        return self.decoder.info.get("sigma")

    def encode(self, x):
        """See Encoder.encode."""
        return self.encoder.encode(x)

    def decode(self, z):
        """See Decoder.decode."""
        return self.decoder.decode(z)

    def sample(self, n: int, seed=None):
        """See Decoder.sample."""
        return self.decoder.sample(n, seed)

    def reconstruct(self, x) -> np.ndarray:
        """Images -> decode(loc): the decoder's mean at the posterior's mean (no sampling)."""
        loc, _ = self.encode(x)
        return self.decode(loc)

    def interpolate(self, x_a, x_b, steps: int = 8) -> np.ndarray:
        """Decodes `steps` points on the straight line between the posterior means of two images.

        Args:
          x_a, x_b: one image each ((H, W, C)), or equal batches ((B, H, W, C)).
          steps: points including both ends (>= 2).

        Returns:
          (steps, H, W, C) for single images, (B, steps, H, W, C) for batches.
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
            raise RuntimeInputError(f"steps must be an integer >= 2, got {steps!r}")
        loc_a, _ = self.encode(x_a)
        loc_b, _ = self.encode(x_b)
        if loc_a.shape != loc_b.shape:
            raise RuntimeInputError(f"x_a and x_b must hold as many images; got {np.shape(x_a)} "
                                    f"and {np.shape(x_b)}")
        t = np.linspace(0.0, 1.0, int(steps), dtype=np.float32)[:, None]
        if loc_a.ndim == 1:
            return self.decode((1 - t) * loc_a + t * loc_b)
        z = (1 - t)[None] * loc_a[:, None] + t[None] * loc_b[:, None]  # (B, steps, D)
        return self.decode(z.reshape(-1, self.latent_dim)).reshape(len(loc_a), int(steps),
                                                                   *self.image_shape)

    def log_likelihood(self, x, k: int = 100, seed=0, budget: int = 1 << 22) -> np.ndarray:
        """Importance-weighted estimate of log P(X) per image, in nats (Burda et al. 2015).

            log P(X) ~= log (1/k) sum_i P(X|z_i) P(z_i) / Q(z_i|X),   z_i = loc + scale * eps_i

        kvae.iwae computes it (float64, chunks of at most about `budget` decoded pixels), with its
        clip rule for Bernoulli probabilities at this decoder's resolution (`Decoder.p_range`).
        Gaussian: N(x; x_mean, sigma^2 I) with the manifest's sigma.

        Args:
          x: images in [0, 1] (binarized for a Bernoulli likelihood) or uint8; see Encoder.encode.
          k: importance samples per image.
          seed: int or numpy Generator for eps (default 0: the same numbers every time).
          budget: decoded pixels held at once.

        Returns:
          (B,) float64 log P(X) estimates (a float for one image).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RuntimeInputError(f"k must be a positive integer, got {k!r}")
        likelihood, sigma = self.likelihood, self.sigma
        if likelihood not in ("bernoulli", "gaussian"):
            raise RuntimeInputError(f"unknown likelihood {likelihood!r}: pass likelihood='bernoulli' or "
                                    "'gaussian' (and sigma) when there is no manifest.json")
        if likelihood == "gaussian" and not (sigma and sigma > 0):
            raise RuntimeInputError("a Gaussian likelihood needs sigma > 0 (manifest.json or sigma=...)")
        x, single = check_images(x, self.image_shape)
        rng = _rng(seed)
        rows = max(1, budget // int(np.prod(self.image_shape)))  # decoded images per call
        out = np.empty(len(x), np.float64)
        batch = max(1, min(len(x), rows, 100))
        for start in range(0, len(x), batch):
            xb = x[start:start + batch]
            loc, scale = self.encoder.encode(xb)
            eps = rng.standard_normal((k, len(xb), self.latent_dim))  # the stream chunk by chunk
            out[start:start + len(xb)] = -iwae.nll(xb, loc, scale, eps, self.decoder.decode, likelihood,
                                                   sigma, self.decoder.p_range, chunk=rows)
        return float(out[0]) if single else out
