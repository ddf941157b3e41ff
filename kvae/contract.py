"""The exported-file contract: what kvae.export writes and kvae.runtime, export/report.py,
bench/latency.py, the demo and the tests read. numpy and json only (no TensorFlow).

RUN/export/ holds `<half>[.<precision>].<format>` files (`filename`) and `manifest.json`, one
entry per file (format, precision, sha256, size, I/O names and shapes, parity against Keras,
the NLL change of quantized files) under a header (latent_dim, image_shape, likelihood, sigma,
preprocessing, the sha256 of the Keras files they came from). Signatures, the same in both formats:

    encoder  x (batch, H, W, C) float32 in [0, 1]  ->  loc, scale (batch, latent_dim) float32
    decoder  z (batch, latent_dim) float32         ->  x_mean (batch, H, W, C) float32

A conditional model (trained with --conditional) has one more input in both halves, the
condition `y`: float32 (batch, num_classes), the one-hot class label; the header then names the
classes ("classes", index = class id).

A run trained with a learned prior (`--prior-mixture K`, the default) or a fitted sampling prior
(kvae.prior, `--prior-components K`) also has `prior.json` in RUN/export/, copied from the run
folder and named in the header's "prior" entry ({"file", "sha256", "components"}): the Gaussian
mixture that runtimes draw z from to sample (weights [K], loc and scale [K][latent_dim]: pick k
with probability weights[k], then z = loc[k] + scale[k] * eps). Marked `"model_prior": true` it
is the model's own P(z), which likelihoods use; otherwise it is for sampling only and
likelihoods use the model's N(0, I).

Every file also carries key/value metadata (`metadata` below): ONNX `metadata_props`, and in a
.tflite file a JSON entry named `kvae` in the flatbuffer's metadata table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from kvae.files import atomic_write_json, read_json_object

HALVES = ("encoder", "decoder")
PRECISIONS = ("fp32", "fp16", "int8")
QUANTIZED = ("fp16", "int8")
FORMATS = ("tflite", "onnx")
ORT_FORMAT = "ort"  # onnxruntime's own format, converted from the .onnx files (to_onnx.py --ort); not in FORMATS
ORT_OPERATORS = "required_operators_and_types.config"  # what the .ort files need: a reduced onnxruntime build's config
ORT_OPERATORS_ENTRY = "ort_operators"  # the manifest header's entry naming ORT_OPERATORS and its .ort models
INPUT = {"encoder": "x", "decoder": "z"}
CONDITION = "y"  # the second input of a conditional model's halves: one-hot (batch, num_classes)
OUTPUTS = {"encoder": ("loc", "scale"), "decoder": ("x_mean",)}
MANIFEST = "manifest.json"
PRIOR = "prior.json"  # the sampling prior (learned or fitted), in the run folder and next to the exported decoder
PRIOR_ENTRY = "prior"  # the manifest header's entry naming it: {"file": PRIOR, "sha256", "components"}
TFLITE_METADATA = "kvae"  # the name of kvae's entry in a .tflite file's metadata table
_TFLITE_IDENTIFIER = b"TFL3"


def inputs(half: str, conditional: bool = False) -> tuple[str, ...]:
    """The input names of a half: ("x",) / ("z",), and CONDITION after it for a conditional model."""
    return (INPUT[half], CONDITION) if conditional else (INPUT[half],)


def filename(half: str, precision: str, fmt: str) -> str:
    """encoder.tflite, decoder.fp16.onnx, ..."""
    return f"{half}.{fmt}" if precision == "fp32" else f"{half}.{precision}.{fmt}"


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict:
    """folder/manifest.json as a dict; {} where there is none.

    Raises:
      ValueError: it exists but cannot be read or is not a JSON object (the message says which).
    """
    return read_json_object(Path(folder) / MANIFEST)


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock on the folder `out` itself: both export scripts may run at once."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def header_files(manifest: dict) -> dict[str, dict]:
    """The manifest header's entries that name a file ({"file": NAME, ...}: PRIOR_ENTRY,
    ORT_OPERATORS_ENTRY), by their key. The files of an export are these and `files`' entries
    (mobile_demo/app.js's offlineFiles reads the same rule)."""
    return {key: value for key, value in manifest.items()
            if key != "files" and isinstance(value, dict) and isinstance(value.get("file"), str)}


def update_manifest(out: str | Path, header: dict, entries: dict[str, dict], removed: tuple = ()) -> dict:
    """Merges `entries` into out/manifest.json (atomically, under a lock) and returns it.

    Entries of files that no longer exist, or that were exported from other Keras files
    (another training of this run: header["source"] differs), are dropped. Header entries that
    name a file ({"file": NAME, ...}, e.g. ORT_OPERATORS) and that `header` lacks are kept while
    that file exists and the Keras files are the same: one exporter's merge keeps the other's.
    """
    out = Path(out)
    with _locked(out):
        current = {}
        with contextlib.suppress(ValueError):
            current = read_manifest(out)
        same_model = current.get("source") == header["source"]
        files = current.get("files", {}) if same_model else {}
        named = {key: value for key, value in header_files(current).items()
                 if same_model and key not in header and (out / value["file"]).is_file()}
        stale = sorted(set(current.get("files", {})) - set(files))
        if stale:
            print(f"kvae.export: dropped manifest entries from an older model: {', '.join(stale)} "
                  "(export again to refresh them)", flush=True)
        files.update(entries)
        files = {name: entry for name, entry in sorted(files.items())
                 if name not in removed and (out / name).exists()}
        manifest = {**header, **named, "files": files}
        atomic_write_json(out / MANIFEST, manifest)
    return manifest


def add_tflite_metadata(data: bytes, values: dict[str, str]) -> bytes:
    """Stores `values` as JSON in a .tflite flatbuffer's metadata table under the name `kvae`."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema
    import flatbuffers

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(values, sort_keys=True).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = TFLITE_METADATA
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name not in (b"kvae", "kvae")]
    model.metadata.append(entry)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=_TFLITE_IDENTIFIER)
    return bytes(builder.Output())


def tflite_metadata(path: str | Path) -> dict[str, str]:
    """The `kvae` metadata of a .tflite file ({} where there is none)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == TFLITE_METADATA.encode():
            values = json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
            return {str(k): str(v) for k, v in values.items()} if isinstance(values, dict) else {}
    return {}


def onnx_metadata(proto) -> dict[str, str]:
    """The metadata_props of an onnx.ModelProto (or of an onnxruntime session's modelmeta)."""
    props = getattr(proto, "custom_metadata_map", None)
    if props is not None:
        return dict(props)
    return {p.key: p.value for p in proto.metadata_props}


def set_onnx_metadata(proto, values: dict[str, str]):
    """Replaces an onnx.ModelProto's metadata_props with `values`; returns the proto."""
    del proto.metadata_props[:]
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto
