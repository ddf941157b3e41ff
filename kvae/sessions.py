"""Sessions on exported files: the onnxruntime / LiteRT code that runs a `.onnx`, `.ort` or
`.tflite` file, with the batch planning and padding of fixed-batch signatures. One layer for everyone:
kvae.runtime's Encoder / Decoder (what users run) and the export self-check (kvae.export_checks),
which runs every file it writes through it before the file gets its final name.

numpy only at import; onnxruntime or LiteRT is imported when a file of its format is opened.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from kvae import contract
from kvae.errors import KVAEError

EXTENSIONS = {f".{fmt}": fmt for fmt in (*contract.FORMATS, contract.ORT_FORMAT)}  # file suffix -> format
ONNXRUNTIME = ("onnx", contract.ORT_FORMAT)  # the formats onnxruntime opens (.ort: its own format)


class RuntimeInputError(ValueError, KVAEError):
    """A bad input or model file, described in one line (a ValueError and a KVAEError)."""


# --------------------------------------------------------------------------- finding and opening files


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
    if not path.exists() and path.suffix.lower() not in EXTENSIONS:
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


def manifest_entry(path: Path) -> tuple[dict, dict | None]:
    """manifest.json beside `path` -> (manifest, this file's entry); ({}, None) if there is none."""
    try:
        manifest = contract.read_manifest(path.parent)
    except ValueError as e:
        raise RuntimeInputError(str(e)) from None
    entry = (manifest.get("files") or {}).get(path.name)
    return manifest, entry if isinstance(entry, dict) else None


def verify(path: Path, entry: dict | None) -> None:
    """The file's sha256 must be its manifest entry's (`verify=True` in kvae.runtime)."""
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



class Session:
    """One opened model: named float inputs -> named outputs, in chunks of any batch size.

    Args:
      path: `.onnx`, `.ort` (onnxruntime) or `.tflite` (LiteRT) file.
      threads: CPU threads for the runtime (None: the runtime's default).
      xnnpack: TFLite only: use the XNNPACK delegate (faster; off gives the reference kernels).
      max_batch: rows per call for dynamic-batch models (bounds memory).
      prefer_fixed: feed rows through fixed-batch signatures that fit (see `plan`).
      signatures: TFLite only: the signatures to call (e.g. `("batch64",)`), each of which must
        exist and match `serving_default`'s names and inner shapes; None: `serving_default` and
        every matching `batch<N>`. The export self-check calls each signature this way.

    Attributes:
      inputs, outputs: name -> (shape with None for a dynamic dim, numpy dtype).
      signature_list: TFLite: every signature in the file, {key: {"inputs": [...], "outputs":
        [...]}}; ONNX: None.
    """

    def __init__(self, path: Path, threads: int | None = None, xnnpack: bool = True,
                 max_batch: int = 256, prefer_fixed: bool = True,
                 signatures: tuple[str, ...] | None = None):
        self.path = Path(path)
        self.format = EXTENSIONS.get(self.path.suffix.lower())
        if self.format is None:
            raise RuntimeInputError(f"{self.path}: unknown model format {self.path.suffix!r}; "
                                    "expected a .onnx, .ort or .tflite file")
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
        self.signature_list = None
        if self.format in ONNXRUNTIME:
            if signatures is not None:
                raise RuntimeInputError(f"{self.path}: an ONNX file has no signatures to choose")
            self._open_onnx(threads)
        else:
            self._open_tflite(threads, xnnpack, signatures)

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
            kind = "an ORT-format" if self.format == contract.ORT_FORMAT else "an ONNX"
            raise RuntimeInputError(f"cannot load {self.path} as {kind} model (truncated, corrupt or "
                                    f"not a model?): {first_line(e)}") from None
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

    def _open_tflite(self, threads, xnnpack, wanted):
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
                                    f"not a model?): {first_line(e)}") from None
        if "serving_default" not in signatures:
            raise RuntimeInputError(f"{self.path} has no 'serving_default' signature (found: "
                                    f"{', '.join(signatures) or 'none'}); export it with export/to_tflite.py")

        def spec(d):
            signature = d.get("shape_signature", d["shape"])
            return tuple(int(s) if s >= 0 else None for s in signature), np.dtype(d["dtype"]).type

        self.signature_list = signatures
        unknown = [key for key in wanted or () if key not in signatures]
        if unknown:
            raise RuntimeInputError(f"{self.path} has no signature {', '.join(map(repr, unknown))} "
                                    f"(found: {', '.join(signatures)})")
        # serving_default, plus the fixed-batch fast paths `batch<N>` (XNNPACK runs a fixed-shape
        # Conv2DTranspose much faster) when their names and inner shapes match serving_default's
        self._runners = {}
        for key in ["serving_default", *sorted(k for k in signatures if k != "serving_default")]:
            if wanted is not None and key not in wanted and key != "serving_default":
                continue
            try:
                runner = self._interpreter.get_signature_runner(key)
                in_details, out_details = runner.get_input_details(), runner.get_output_details()
            except Exception as e:  # e.g. an op this LiteRT build lacks (Flex ops)
                raise RuntimeInputError(f"cannot run {self.path} in LiteRT: {first_line(e)}") from None
            inputs = {name: spec(d) for name, d in in_details.items()}
            outputs = {name: spec(d) for name, d in out_details.items()}
            if key == "serving_default":
                self.inputs, self.outputs = inputs, outputs
            elif not (key.startswith("batch") and key[5:].isdigit() and _same_but_batch(
                    (inputs, outputs), (self.inputs, self.outputs), int(key[5:]))):
                if wanted is not None:
                    raise RuntimeInputError(f"{self.path}: signature {key!r} does not take batch "
                                            f"{key[5:] or '?'} of serving_default's inputs and outputs")
                continue  # some other signature: not ours to call
            if wanted is None or key in wanted:
                self._runners[_batch_of(inputs)] = runner
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
        if self.format in ONNXRUNTIME:
            return self.metadata
        try:
            return contract.tflite_metadata(self.path)
        except Exception:  # no schema module or unreadable metadata: fall back to the shapes
            return {}

    @property
    def batches(self) -> list[int | None]:
        """Batch sizes the file takes: None for a dynamic batch, ints for fixed-batch signatures."""
        if self.format in ONNXRUNTIME:
            return [_batch_of(self.inputs)]
        return list(self._runners)

    @property
    def fixed_batch(self) -> int | None:
        """The batch size of a static-batch file (None: it takes any batch)."""
        return None if None in self.batches else min(self.batches)

    def plan(self, n: int) -> list[tuple[int, int, int | None]]:
        """(start, rows, signature batch) per runtime call for n rows.

        A fixed-batch signature that fits takes the rows (TFLite `batch1` row by row: faster than
        the dynamic signature for the conv decoder under XNNPACK, see kvae/export_tflite.py), then the
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
            if key is not None and rows < key:  # the last chunk of a static-batch file
                chunk = {name: pad(value, key) for name, value in chunk.items()}
            for name, value in self._call(chunk, key).items():
                parts[name].append(value[:rows])
        return {name: np.concatenate(p) for name, p in parts.items()}

    def _call(self, feeds: dict[str, np.ndarray], key: int | None) -> dict[str, np.ndarray]:
        feeds = {name: np.ascontiguousarray(value, dtype=self.inputs[name][1])
                 for name, value in feeds.items()}
        if self.format in ONNXRUNTIME:
            values = self._session.run(list(self.outputs), feeds)
            result = dict(zip(self.outputs, values))
        else:
            try:
                with self._lock:  # an interpreter's tensors are shared: threads take turns
                    result = {name: np.array(value, dtype=np.float32)
                              for name, value in self._runners[key](**feeds).items()}
            except Exception as e:  # e.g. "failed to reshape" for batches the file cannot take
                raise RuntimeInputError(f"{self.path}: LiteRT failed on a batch of "
                                        f"{len(next(iter(feeds.values())))}: {first_line(e)}") from None
        return {name: np.asarray(value, dtype=np.float32) for name, value in result.items()}


def pad(rows: np.ndarray, batch: int) -> np.ndarray:
    """`rows` followed by zero rows up to `batch` (the outputs of the first len(rows) are kept)."""
    return np.concatenate([rows, np.zeros((batch - len(rows), *rows.shape[1:]), rows.dtype)])


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


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none), at most 300 characters."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
