"""TensorFlow-free inference on the exported halves: numpy plus onnxruntime or LiteRT.

    pip install kvae                            # numpy, onnxruntime, pillow; kvae[litert] adds LiteRT

    from kvae.runtime import VAE
    vae = VAE.from_folder("runs/quickstart")    # RUN/export/{encoder,decoder}.onnx
    images = vae.sample(16, seed=0)             # (16, 28, 28, 1) in [0, 1]
    loc, scale = vae.encode(images)             # (16, latent_dim) each

A conditional model (`python -m kvae.fit --conditional`) takes a class label in both halves:
`vae.sample(16, seed=0, label=7)`, `vae.encode(images, label=7)` (an id, a name from
`vae.classes`, or one per image); a missing or unknown label raises RuntimeInputError.

The format follows the file's extension (`.onnx` -> onnxruntime, `.tflite` -> LiteRT); the
runtime module is imported only when a file of its format is opened. latent_dim, image shape and
likelihood come from `manifest.json` beside the file (written by the export scripts), else from
the ONNX file's metadata, else from the model's input and output shapes.

Sampling draws z on the host with numpy's Generator: a seed gives the same images in every
process, no seed gives new ones. When the export has a fitted sampling prior (`prior.json`,
named in the manifest; kvae.prior) z comes from it (`prior="fitted"`, the default then), else,
or with `prior="standard"`, z = eps ~ N(0, I). A prior.json marked as the model's learned P(z)
(the default training) is also the prior of `VAE.log_likelihood`. (Random ops inside the
exported graph replay one sequence per onnxruntime session and cannot take a seed:
docs/design.md, "Random ops".)

Nothing here imports TensorFlow, and `import kvae.runtime` imports only numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvae import contract, iwae, sessions
from kvae.runtime_inputs import (as_array, check_images, check_latents, check_output, condition,
                                 generator)
from kvae.sessions import RuntimeInputError, Session, manifest_entry, resolve

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
        if set(found_in) == {*inputs, contract.CONDITION}:  # a conditional model's half
            inputs = (*inputs, contract.CONDITION)
        if set(found_in) != set(inputs) or set(found_out) != set(outputs):
            other = "encoder" if self.half == "decoder" else "decoder"
            if set(found_out) == set(SIGNATURES[other][1]):
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
        self.classes: tuple[str, ...] = tuple(self.info["classes"])  # () unless conditional
        # the manifest's entry of the decoder's fitted sampling prior (read when first sampled)
        self._prior_entry = manifest.get(contract.PRIOR_ENTRY) if self.half == "decoder" else None
        self._prior: dict | None = None

    @property
    def format(self) -> str:
        return self.session.format

    @property
    def num_classes(self) -> int:
        """The size of the condition y (0: an unconditional model)."""
        return len(self.classes)

    def condition(self, label, n: int) -> np.ndarray | None:
        """The one-hot y (n, num_classes) for `label`, or None for an unconditional model.

        Args:
          label: a class id (int, 0..num_classes-1), a class name (str, see `classes`), a list of
            them (one per row, or one for all rows), or a float (n, num_classes) array used as y.

        Raises:
          RuntimeInputError: a label on an unconditional model, none on a conditional one, or
            an unknown class (one line).
        """
        return condition(label, n, self.classes, self.path)

    def _feeds(self, name: str, values: np.ndarray, label) -> dict[str, np.ndarray]:
        y = self.condition(label, len(values))
        return {name: values} if y is None else {name: values, contract.CONDITION: y}

    def __repr__(self):
        return (f"{type(self).__name__}({str(self.path)!r}, format={self.format!r}, "
                f"latent_dim={self.latent_dim}, image_shape={self.image_shape})")


def _describe(manifest: dict, entry: dict | None, meta: dict, session: Session, half: str) -> dict:
    """latent_dim, image_shape, likelihood, sigma, precision and where they came from."""
    if manifest:
        source = "manifest.json"
        info = {key: manifest.get(key) for key in ("latent_dim", "image_shape", "likelihood", "sigma",
                                                    "classes")}
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
                    "quantization": meta.get("quantization"),
                    "classes": json.loads(meta["classes"]) if "classes" in meta else None}
        except (ValueError, TypeError) as e:
            raise RuntimeInputError(f"{session.path}: unreadable kvae metadata: {e}") from None
    else:
        source = "model shapes"
        info = {"latent_dim": None, "image_shape": None, "likelihood": None, "sigma": None,
                "precision": "fp32", "quantization": None, "classes": None}
    # the model's own shapes fill gaps and must agree with the metadata
    if half == "decoder":
        latent = session.inputs["z"][0][-1]
        image = session.outputs["x_mean"][0][1:]
    else:
        latent = session.outputs["loc"][0][-1]
        image = session.inputs["x"][0][1:]
    num_classes = session.inputs[contract.CONDITION][0][-1] if contract.CONDITION in session.inputs else 0
    if not num_classes:
        info["classes"] = []
    elif not info["classes"]:  # no names recorded: the class ids are the names
        info["classes"] = [str(i) for i in range(num_classes)]
    if not isinstance(info["classes"], list) or len(info["classes"]) != num_classes:
        raise RuntimeInputError(f"{session.path} takes {num_classes} classes but its {source} names "
                                f"{info['classes']!r}: the file and its manifest are from different "
                                "exports: export the run again")
    info["classes"] = [str(c) for c in info["classes"]]
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


def _fitted_prior(path: Path, entry, latent_dim: int) -> dict:
    """The prior a manifest entry names (kvae.prior), its name and sha256 checked."""
    from kvae import prior as kprior

    folder = Path(path).parent
    if not isinstance(entry, dict) or entry.get("file") != contract.PRIOR:
        raise RuntimeInputError(f"{folder / contract.MANIFEST}: its {contract.PRIOR_ENTRY!r} entry must "
                                f"name {contract.PRIOR} (got {entry!r:.80}); export the run again")
    file = folder / contract.PRIOR
    if not file.is_file():
        raise RuntimeInputError(f"{file} is missing: {folder / contract.MANIFEST} names it as the "
                                "fitted prior; copy it with the decoder, export the run again, or "
                                "sample with prior='standard'")
    if contract.sha256(file) != entry.get("sha256"):
        raise RuntimeInputError(f"{file} does not match the sha256 in its manifest: export the run again")
    try:
        return kprior.read(file, latent_dim)
    except ValueError as e:
        raise RuntimeInputError(str(e)) from None


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

    def decode(self, z, y=None) -> np.ndarray:
        """z (B, latent_dim) or (latent_dim,) -> x_mean (B, H, W, C) or (H, W, C), float32 in [0, 1].

        Args:
          y: a conditional decoder's condition: labels (see `condition`) or a float (B,
            num_classes) array; None for an unconditional one.
        """
        z = as_array(z, "z")
        single = z.ndim == 1
        z = check_latents(z if not single else z[None], self.latent_dim)
        feeds = self._feeds("z", z, y)
        if len(z) == 0:
            return np.zeros((0, *self.image_shape), np.float32)
        x_mean = self.session.run(**feeds)["x_mean"]
        check_output(x_mean, "x_mean", self.path, f"for z up to |{float(np.abs(z).max()):.3g}|",
                      "keep z to moderate values (as the prior's samples are); if they are, the file is "
                      "broken: export it again")
        return x_mean[0] if single else x_mean

    @property
    def p_range(self) -> tuple[float, float]:
        """The probabilities a Bernoulli log-likelihood clips x_mean to: this file's resolution
        (kvae.iwae's clip rule; an int8 file that is not dynamic-range quantized outputs an
        int8 grid)."""
        return iwae.p_range(self.info.get("precision", "fp32"), self.info.get("quantization"))

    def sample(self, n: int, seed=None, label=None, prior: str | None = None) -> np.ndarray:
        """n images: z from the sampling prior, drawn by numpy, then decoded.

        Args:
          n: number of images.
          seed: int or numpy Generator; the same seed gives the same images in any process.
          label: a conditional model's class: an id, a name, or one per image (`condition`).
          prior: "fitted" (the export's prior.json: the default when there is one) or
            "standard" (z = eps ~ N(0, I): the default otherwise).
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise RuntimeInputError(f"n must be a non-negative integer, got {n!r}")
        return self.decode(self.draw_z(int(n), seed, prior), label)

    def draw_z(self, n: int, seed=None, prior: str | None = None) -> np.ndarray:
        """z (n, latent_dim) float32 from the sampling prior (see `sample`)."""
        from kvae import prior as kprior

        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise RuntimeInputError(f"n must be a non-negative integer, got {n!r}")
        prior = self.sampling_prior if prior is None else prior
        if prior not in kprior.PRIORS:
            raise RuntimeInputError(f"prior must be one of {', '.join(kprior.PRIORS)}, got {prior!r}")
        if prior == "fitted" and self._prior_entry is None:
            raise RuntimeInputError(f"{self.path} has no fitted prior (no prior.json in its manifest): "
                                    "sample with prior='standard', or train with a learned prior (the default) "
                                    "or --prior-mixture 0 --prior-components K")
        return kprior.draw(self.prior if prior == "fitted" else None, int(n), self.latent_dim,
                           generator(seed))

    @property
    def prior(self) -> dict | None:
        """The export's fitted sampling prior (prior.json, checked against the manifest's sha256
        when first used), or None when the manifest names none."""
        if self._prior is None and self._prior_entry is not None:
            self._prior = _fitted_prior(self.path, self._prior_entry, self.latent_dim)
        return self._prior

    @property
    def model_prior(self) -> dict | None:
        """The model's learned P(z) when the export's prior.json is one (kvae.prior), else None: N(0, I)."""
        from kvae import prior as kprior

        return kprior.model_prior(self.prior)

    @property
    def sampling_prior(self) -> str:
        """What `sample` draws z from by default: "fitted" when the export has a prior, else "standard"."""
        return "standard" if self._prior_entry is None else "fitted"


class Encoder(_Half):
    """x (B, H, W, C) in [0, 1] -> (loc, scale) of Q(z|X) from an exported encoder file.

    Same arguments as `Decoder`; a folder opens encoder.onnx, else encoder.tflite.
    """

    half = "encoder"

    def encode(self, x, label=None) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (loc, scale), each (B, latent_dim), or (latent_dim,) for one image.

        Args:
          x: (B, H, W, C) or one (H, W, C) image (for one channel also (B, H, W) / (H, W));
            floats in [0, 1], or integers 0..255 (uint8 images as read from files).
          label: a conditional encoder's class of the images (`condition`); None otherwise.
        """
        x, single = check_images(x, self.image_shape)
        feeds = self._feeds("x", x, label)
        if len(x) == 0:
            empty = np.zeros((0, self.latent_dim), np.float32)
            return empty, empty.copy()
        out = self.session.run(**feeds)
        loc, scale = out["loc"], out["scale"]
        check_output(np.concatenate([loc, scale]), "loc, scale", self.path, "for images in [0, 1]",
                      "the file is broken: export it again")
        return (loc[0], scale[0]) if single else (loc, scale)


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
        if self.encoder.classes != self.decoder.classes:
            raise RuntimeInputError(f"{self.encoder.path} (classes {list(self.encoder.classes)}) and "
                                    f"{self.decoder.path} (classes {list(self.decoder.classes)}) do "
                                    "not belong together")
        self.latent_dim = self.decoder.latent_dim
        self.image_shape = self.decoder.image_shape
        self.classes = self.decoder.classes  # a conditional model's class names; () otherwise

    @classmethod
    def from_folder(cls, folder, format: str | None = None, precision: str = "fp32",
                    encoder_precision: str = "fp32", **options) -> "VAE":
        """Opens RUN/export/ (or an export folder): encoder.<fmt> and decoder[.<precision>].<fmt>.

        Args:
          folder: run folder or export folder.
          format: `onnx`, `tflite` or `ort` (onnxruntime's format, export/to_onnx.py --ort)
            (default: onnx when present, else tflite).
          precision: the decoder's: `fp32`, `fp16` or `int8`.
          encoder_precision: the encoder's.
        """
        if format not in (None, "onnx", "tflite", "ort"):
            raise RuntimeInputError(f"format must be 'onnx', 'tflite' or 'ort', got {format!r}")
        return cls(resolve(folder, "encoder", format, encoder_precision),
                   resolve(folder, "decoder", format, precision), **options)

    @property
    def likelihood(self) -> str | None:
        return self.decoder.info.get("likelihood")

    @property
    def sigma(self) -> float | None:
        return self.decoder.info.get("sigma")

    def encode(self, x, label=None):
        """See Encoder.encode (`label`: a conditional model's class, see _Half.condition)."""
        return self.encoder.encode(x, label)

    def decode(self, z, label=None):
        """See Decoder.decode."""
        return self.decoder.decode(z, label)

    def sample(self, n: int, seed=None, label=None, prior: str | None = None):
        """See Decoder.sample: n images (of class `label` for a conditional model), z from the
        fitted prior when the export has one (or `prior="standard"`: N(0, I))."""
        return self.decoder.sample(n, seed, label, prior)

    def reconstruct(self, x, label=None) -> np.ndarray:
        """Images -> decode(loc): the decoder's mean at the posterior's mean (no sampling)."""
        loc, _ = self.encode(x, label)
        return self.decode(loc, label)

    def interpolate(self, x_a, x_b, steps: int = 8, label=None) -> np.ndarray:
        """Decodes `steps` points on the straight line between the posterior means of two images.

        Args:
          x_a, x_b: one image each ((H, W, C)), or equal batches ((B, H, W, C)).
          steps: points including both ends (>= 2).
          label: a conditional model's class, for both images and every point.

        Returns:
          (steps, H, W, C) for single images, (B, steps, H, W, C) for batches.
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
            raise RuntimeInputError(f"steps must be an integer >= 2, got {steps!r}")
        loc_a, _ = self.encode(x_a, label)
        loc_b, _ = self.encode(x_b, label)
        if loc_a.shape != loc_b.shape:
            raise RuntimeInputError(f"x_a and x_b must hold as many images; got {np.shape(x_a)} "
                                    f"and {np.shape(x_b)}")
        t = np.linspace(0.0, 1.0, int(steps), dtype=np.float32)[:, None]
        if loc_a.ndim == 1:
            return self.decode((1 - t) * loc_a + t * loc_b, label)
        z = (1 - t)[None] * loc_a[:, None] + t[None] * loc_b[:, None]  # (B, steps, D)
        return self.decode(z.reshape(-1, self.latent_dim), label).reshape(len(loc_a), int(steps),
                                                                   *self.image_shape)

    def log_likelihood(self, x, k: int = 100, seed=0, budget: int = 1 << 22,
                       label=None) -> np.ndarray:
        """Importance-weighted estimate of log P(X) (log P(X|y) with a conditional model's
        `label`) per image, in nats (Burda et al. 2015).

            log P(X) ~= log (1/k) sum_i P(X|z_i) P(z_i) / Q(z_i|X),   z_i = loc + scale * eps_i

        kvae.iwae computes it (float64, chunks of at most about `budget` decoded pixels), with its
        clip rule for Bernoulli probabilities at this decoder's resolution (`Decoder.p_range`),
        and P(z) the model's: its learned prior when prior.json is one, else N(0, I).
        Gaussian: N(x; x_mean, sigma^2 I) with the manifest's sigma.

        Args:
          x: images in [0, 1] (binarized for a Bernoulli likelihood) or uint8; see Encoder.encode.
          k: importance samples per image.
          seed: int or numpy Generator for eps (default 0: the same numbers every time).
          budget: decoded pixels held at once.
          label: a conditional model's class of the images (one, or one per image).

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
        y = self.decoder.condition(label, len(x))
        rng = generator(seed)
        prior = self.decoder.model_prior
        rows = max(1, budget // int(np.prod(self.image_shape)))  # decoded images per call
        out = np.empty(len(x), np.float64)
        batch = max(1, min(len(x), rows, 100))
        for start in range(0, len(x), batch):
            xb, yb = x[start:start + batch], None if y is None else y[start:start + batch]
            loc, scale = self.encoder.encode(xb, yb)
            eps = rng.standard_normal((k, len(xb), self.latent_dim))  # the stream chunk by chunk
            out[start:start + len(xb)] = -iwae.nll(xb, loc, scale, eps, self.decoder.decode, likelihood,
                                                   sigma, self.decoder.p_range, chunk=rows, y=yb,
                                                   prior=prior)
        return float(out[0]) if single else out
