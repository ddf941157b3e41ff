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
import threading
from pathlib import Path

import numpy as np

from kvae import contract, iwae
from kvae.errors import KVAEError

FORMATS = {f".{fmt}": fmt for fmt in contract.FORMATS}
SIGNATURES = {half: ((contract.INPUT[half],), contract.OUTPUTS[half]) for half in contract.HALVES}


class RuntimeInputError(ValueError, KVAEError):
    """A bad input or model file, described in one line (a ValueError and a KVAEError)."""


# --------------------------------------------------------------------------- opening files


def find_export(path: str | Path) -> Path:
    """A run folder (holding export/) or an export folder -> the export folder."""
    path = Path(path)
    if (path / "export").is_dir():
        return path / "export"
    if path.is_dir():
        return path
    raise RuntimeInputError(f"no such folder: {path}")


def resolve(path: str | Path, half: str, format: str | None = None, precision: str = "fp32") -> Path:
    """A model file, an export folder or a run folder -> the `half` model file to open.

    In a folder, picks `<half>[.<precision>].onnx`, else the `.tflite` one (or only `format`).
    """
    path = Path(path)
    if not path.exists() and path.suffix.lower() not in FORMATS:
        raise RuntimeInputError(f"no such file or folder: {path}")
    if not path.is_dir():
        return path
    folder = find_export(path)
    formats = [format] if format else ["onnx", "tflite"]
    names = [contract.filename(half, precision or "fp32", fmt) for fmt in formats]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    wanted = " or ".join(names)
    raise RuntimeInputError(f"{folder} has no {wanted}; export the run first: "
                            "python export/to_onnx.py RUN (or export/to_tflite.py RUN)")


def read_manifest(path: Path) -> tuple[dict, dict | None]:
    """manifest.json beside `path` -> (manifest, this file's entry); ({}, None) if there is none."""
    try:
        manifest = contract.read_manifest(path.parent)
    except ValueError as e:
        raise RuntimeInputError(str(e)) from None
    entry = (manifest.get("files") or {}).get(path.name)
    return manifest, entry if isinstance(entry, dict) else None


class _Session:
    """One opened model: named float inputs -> named outputs, in chunks of any batch size.

    Args:
      path: `.onnx` or `.tflite` file.
      threads: CPU threads for the runtime (None: the runtime's default).
      xnnpack: TFLite only: use the XNNPACK delegate (faster; off gives the reference kernels).
      max_batch: rows per call for dynamic-batch models (bounds memory).
    """

    def __init__(self, path: Path, threads: int | None = None, xnnpack: bool = True,
                 max_batch: int = 256, prefer_fixed: bool = True):
        self.path = Path(path)
        self.format = FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise RuntimeInputError(f"{self.path}: unknown model format {self.path.suffix!r}; "
                                    "expected a .onnx or .tflite file")
        if not self.path.is_file():
            raise RuntimeInputError(f"no such model file: {self.path}")
        if self.path.stat().st_size == 0:
            raise RuntimeInputError(f"{self.path} is empty (0 bytes): export it again")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise RuntimeInputError(f"threads must be a positive integer, got {threads!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise RuntimeInputError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.max_batch = max_batch
        self.prefer_fixed = prefer_fixed
        self._lock = threading.Lock()  # a LiteRT interpreter runs one call at a time
        if self.format == "onnx":
            self._open_onnx(threads)
        else:
            self._open_tflite(threads, xnnpack)

    # inputs / outputs: name -> (shape with None for dynamic dims, numpy dtype)
    def _open_onnx(self, threads):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeInputError("reading .onnx files needs onnxruntime: pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(self.path), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for bad protobufs and graphs
            raise RuntimeInputError(f"cannot load {self.path} as an ONNX model (truncated, corrupt or "
                                    f"not a model?): {_first_line(e)}") from None
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                 "tensor(double)": np.float64, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
                 "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}

        def spec(arg):
            shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
            return shape, types.get(arg.type, arg.type)

        self.inputs = {a.name: spec(a) for a in self._session.get_inputs()}
        self.outputs = {a.name: spec(a) for a in self._session.get_outputs()}
        self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        self._check_float_io()

    def _open_tflite(self, threads, xnnpack):
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError:
            raise RuntimeInputError("reading .tflite files needs LiteRT: pip install ai-edge-litert") from None
        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self._interpreter = Interpreter(model_path=str(self.path), num_threads=threads,
                                            experimental_op_resolver_type=resolver)
            signatures = self._interpreter.get_signature_list()
        except Exception as e:
            raise RuntimeInputError(f"cannot load {self.path} as a TFLite model (truncated, corrupt or "
                                    f"not a model?): {_first_line(e)}") from None
        if "serving_default" not in signatures:
            raise RuntimeInputError(f"{self.path} has no 'serving_default' signature (found: "
                                    f"{', '.join(signatures) or 'none'}); export it with export/to_tflite.py")

        def spec(d):
            signature = d.get("shape_signature", d["shape"])
            return tuple(int(s) if s >= 0 else None for s in signature), np.dtype(d["dtype"]).type

        # serving_default, plus the fixed-batch fast paths `batch<N>` (XNNPACK runs a fixed-shape
        # Conv2DTranspose much faster) when their names and inner shapes match serving_default's
        self._runners = {}
        for key in ["serving_default", *sorted(k for k in signatures if k != "serving_default")]:
            try:
                runner = self._interpreter.get_signature_runner(key)
                in_details, out_details = runner.get_input_details(), runner.get_output_details()
            except Exception as e:  # e.g. an op this LiteRT build lacks (Flex ops)
                raise RuntimeInputError(f"cannot run {self.path} in LiteRT: {_first_line(e)}") from None
            inputs = {name: spec(d) for name, d in in_details.items()}
            outputs = {name: spec(d) for name, d in out_details.items()}
            if key == "serving_default":
                self.inputs, self.outputs = inputs, outputs
            elif not (key.startswith("batch") and key[5:].isdigit() and _same_but_batch(
                    (inputs, outputs), (self.inputs, self.outputs), int(key[5:]))):
                continue  # some other signature: not ours to call
            batch = _batch_of(inputs)
            self._runners[batch] = runner
        self.metadata = {}
        self._check_float_io()

    def _check_float_io(self):
        for name, (_, dtype) in {**self.inputs, **self.outputs}.items():
            if dtype not in (np.float32, np.float16, np.float64):
                kind = np.dtype(dtype).name if isinstance(dtype, type) else dtype
                raise RuntimeInputError(f"{self.path}: tensor {name!r} is {kind}; kvae files keep float32 "
                                        "inputs and outputs (int8 files too): export/to_onnx.py, to_tflite.py")

    def read_metadata(self) -> dict[str, str]:
        """kvae's key/value metadata stored in the file (ONNX metadata_props, TFLite `kvae`)."""
        if self.format == "onnx":
            return self.metadata
        try:
            return contract.tflite_metadata(self.path)
        except Exception:  # no schema module or unreadable metadata: fall back to the shapes
            return {}

    @property
    def batches(self) -> list[int | None]:
        """Batch sizes the file takes: None for a dynamic batch, ints for fixed-batch signatures."""
        if self.format == "onnx":
            return [_batch_of(self.inputs)]
        return list(self._runners)

    @property
    def fixed_batch(self) -> int | None:
        """The batch size of a static-batch file (None: it takes any batch)."""
        return None if None in self.batches else min(self.batches)

    def plan(self, n: int) -> list[tuple[int, int, int | None]]:
        """(start, rows, signature batch) per runtime call for n rows.

        A fixed-batch signature that fits takes the rows (TFLite `batch1` row by row: faster than
        the dynamic signature for the conv decoder under XNNPACK, see kvae/export.py), then the
        dynamic signature in chunks of max_batch; a file with fixed batches only gets its last
        chunk padded.
        """
        fixed = sorted((b for b in self.batches if b is not None), reverse=True)
        dynamic = None in self.batches
        calls, start = [], 0
        while start < n:
            left = n - start
            usable = [b for b in fixed if b <= left and (not dynamic or self.prefer_fixed or b == left)]
            if usable:
                rows, key = usable[0], usable[0]
            elif dynamic:
                rows, key = min(left, self.max_batch), None
            else:  # a static-batch file: pad the last chunk to the smallest batch that covers it
                key = min((b for b in fixed if b >= left), default=fixed[0])
                rows = min(left, key)
            calls.append((start, rows, key))
            start += rows
        return calls

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Runs float32 `feeds` (same first dim) through the model in chunks; float32 outputs."""
        n = len(next(iter(feeds.values())))
        parts: dict[str, list] = {name: [] for name in self.outputs}
        for start, rows, key in self.plan(n):
            chunk = {name: value[start:start + rows] for name, value in feeds.items()}
            if key is not None and rows < key:  # pad the last chunk of a static-batch file
                chunk = {name: np.concatenate([v, np.zeros((key - rows, *v.shape[1:]), v.dtype)])
                         for name, v in chunk.items()}
            for name, value in self._call(chunk, key).items():
                parts[name].append(value[:rows])
        return {name: np.concatenate(p) for name, p in parts.items()}

    def _call(self, feeds: dict[str, np.ndarray], key: int | None) -> dict[str, np.ndarray]:
        feeds = {name: np.ascontiguousarray(value, dtype=self.inputs[name][1])
                 for name, value in feeds.items()}
        if self.format == "onnx":
            values = self._session.run(list(self.outputs), feeds)
            result = dict(zip(self.outputs, values))
        else:
            try:
                with self._lock:  # an interpreter's tensors are shared: threads take turns
                    result = {name: np.array(value, dtype=np.float32)
                              for name, value in self._runners[key](**feeds).items()}
            except Exception as e:  # e.g. "failed to reshape" for batches the file cannot take
                raise RuntimeInputError(f"{self.path}: LiteRT failed on a batch of "
                                        f"{len(next(iter(feeds.values())))}: {_first_line(e)}") from None
        return {name: np.asarray(value, dtype=np.float32) for name, value in result.items()}


def _batch_of(specs: dict) -> int | None:
    """The common first dim of the inputs (None: dynamic or mixed)."""
    batch = {shape[0] if shape else None for shape, _ in specs.values()}
    return batch.pop() if len(batch) == 1 else None


def _same_but_batch(signature, reference, batch: int) -> bool:
    """Same names, dtypes and inner shapes as `reference`, first dim `batch` everywhere."""
    for specs, ref in zip(signature, reference):
        if set(specs) != set(ref):
            return False
        for name, (shape, dtype) in specs.items():
            if shape[:1] != (batch,) or shape[1:] != ref[name][0][1:] or dtype != ref[name][1]:
                return False
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# --------------------------------------------------------------------------- the two halves


class _Half:
    """Shared by Encoder and Decoder: opens the file, checks its signature, reads its metadata."""

    half = ""

    def __init__(self, path: str | Path, threads: int | None = None, xnnpack: bool = True,
                 verify: bool = False, max_batch: int = 256, prefer_fixed: bool | None = None,
                 likelihood: str | None = None, sigma: float | None = None):
        path = resolve(path, self.half)
        manifest, entry = read_manifest(path)
        if verify:
            _verify(path, entry)
        if prefer_fixed is None:  # Conv2DTranspose (decoder) needs fixed shapes under XNNPACK
            prefer_fixed = self.half == "decoder" and xnnpack
        self.session = _Session(path, threads=threads, xnnpack=xnnpack, max_batch=max_batch,
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


def _verify(path: Path, entry: dict | None) -> None:
    if entry is None or "sha256" not in entry:
        raise RuntimeInputError(f"cannot verify {path}: manifest.json beside it lists no sha256 for "
                                f"{path.name}")
    if not path.is_file():
        raise RuntimeInputError(f"no such model file: {path}")
    actual = contract.sha256(path)
    if actual != entry["sha256"]:
        raise RuntimeInputError(f"{path} does not match its manifest (sha256 {actual[:12]}..., "
                                f"manifest says {entry['sha256'][:12]}...): the file changed or is "
                                "corrupt; export it again")


def _describe(manifest: dict, entry: dict | None, meta: dict, session: _Session, half: str) -> dict:
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
                                f"{_first_line(e)}") from None


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
