"""ONNX export: Keras half -> `tf2onnx.convert.from_function`, opset 17, batch dim named `batch`.

    python export/to_onnx.py RUN [--quantize fp16 int8] [--int8 best] [--ort]

- fp16: float16 weights, each followed by a Cast to float32 (float32 I/O and arithmetic, half
  the size, runs on every onnxruntime build).
- int8: onnxruntime's static QDQ (calibrated on the run's training images / z) or dynamic
  quantization, both with uint8 weights and activations (INT8_TYPES in kvae.export_checks says
  why); `best` builds both and keeps one (kvae.export_checks.best_int8).
- `--ort` (`export_ort`): each .onnx file written is also converted to onnxruntime's own format
  (`<half>[.<precision>].ort`, what a reduced onnxruntime build for a phone loads) with
  onnxruntime's converter, checked against Keras like the .onnx files, and the operators and
  types the .ort files need are written to `required_operators_and_types.config`
  (contract.ORT_OPERATORS) for a custom build. An ONNX export first removes the folder's .ort
  files and that config (`remove_ort_files`: they were converted from the .onnx files it
  replaces), so without `--ort` the folder has none, never stale ones.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from kvae import iwae
from kvae.contract import (CONDITION, HALVES, INPUT, ORT_FORMAT, ORT_OPERATORS, ORT_OPERATORS_ENTRY,
                           OUTPUTS, PRECISIONS, QUANTIZED, filename, read_manifest, set_onnx_metadata, sha256,
                           update_manifest)
from kvae.errors import KVAEError, describe_os_error
from kvae.export import (Run, export_all, file_entry, load_run, log, manifest_header, metadata,
                         quiet, written_file)
from kvae.export_checks import INT8_TYPES, best_int8, check_file, methods, nll_of_file
from kvae.sessions import first_line

OPSET = 17
# The optimization level onnxruntime's converter bakes into each .ort file (a minimal onnxruntime
# build cannot optimize at load time, and a full build does not re-optimize an .ort file).
# "all" (the converter's default, less the x86-only NCHWc layout) for float32 and int8: the
# fused graph the .onnx file runs as in onnxruntime. "disable" for fp16: every other level
# constant-folds the float16 -> float32 Casts, which stores the weights as float32 again (an
# fp16 .ort file of the float32 file's size); kept as is, the file stays half the size and its
# Casts run in each call (docs/export.md, "ORT format" has the measured cost).
ORT_LEVEL = {"fp32": "all", "fp16": "disable", "int8": "all"}
ORT_STYLE = "Fixed"  # the converter's optimization style: Fixed (CPU), not Runtime (NNAPI / CoreML)


def export_onnx(run: str | Path | Run, out: str | Path | None = None,
                quantize: tuple[str, ...] = QUANTIZED, int8: str = "best", ort: bool = False) -> dict:
    """Writes encoder/decoder .onnx files (float32 and `quantize` variants) and their manifest.

    int8 (`best`): static QDQ and dynamic quantization are both built and measured; the one with
    the lower NLL change on the selection images is written, and the manifest records both under
    "int8_candidates".

    Args:
      run: a run folder (or a loaded Run).
      out: output folder (default RUN/export).
      quantize: quantized variants besides float32: any of `fp16`, `int8`.
      int8: `static` (QDQ, calibrated), `dynamic` or `best` (both; see _best_int8).
      ort: also convert each file to onnxruntime's format (`export_ort`).

    Returns:
      The manifest (dict) after merging this export's entries.

    Raises:
      KVAEError: bad run, failed conversion, or a file that failed its self-check.
    """
    import onnx

    methods(int8)  # a bad value fails before any work
    run = run if isinstance(run, Run) else load_run(run)
    protos = {}

    def write(half: str, precision: str, path: Path, tmp: Path) -> dict:
        if not protos:  # before the first .onnx file replaces one an .ort file was converted from
            remove_ort_files(path.parent, reconverted=ort)
        if half not in protos:
            protos[half] = _onnx_model(run, half).SerializeToString()
        fp32 = onnx.ModelProto.FromString(protos[half])
        extra = {}
        if precision == "fp32":
            proto = fp32
        elif precision == "fp16":
            proto = fp16_weights(fp32)
        else:
            calibration = run.feeds(half, "calibration")
            proto, extra = _onnx_int8(fp32, run, half, calibration, tmp, int8)
        proto = _finish_onnx(proto, run, half, precision, extra.get("quantization"))
        with written_file(path, proto.SerializeToString()) as written:
            check = _check_onnx(written, run, half, precision, path.name)
            if precision == "fp16":
                extra = nll_of_file(run, half, written, 256)
            return file_entry(written, run, half, "onnx", precision, check, batch="dynamic",
                              opset=OPSET, **extra)

    manifest = export_all(run, out, "onnx", quantize, write)
    return export_ort(run, out, quantize) if ort else manifest


def remove_ort_files(out: Path, reconverted: bool = False) -> list[str]:
    """Removes the folder's .ort files (`<half>[.<precision>].ort`) and ORT_OPERATORS, and their
    manifest entries: an ONNX export replaces the .onnx files they were converted from (tf2onnx's
    output differs from one export to the next, so even the same Keras files give new .onnx
    bytes), and a stale .ort file would still be opened by name (kvae.sessions.resolve). They are
    made again by `--ort` (export_ort): `reconverted` only changes the log line.

    Each file is unlinked (a reader has the whole file or none), the .ort files first and then
    the config that lists them; the manifest is then rewritten without them (under its lock,
    atomically, the rest of it as it was). Returns the names removed.

    Raises:
      OSError: a file could not be removed (export_all reports it in one line).
    """
    names = [filename(half, precision, ORT_FORMAT) for half in HALVES for precision in PRECISIONS]
    removed = [name for name in (*names, ORT_OPERATORS) if (out / name).is_file() or (out / name).is_symlink()]
    if not removed:
        return []
    for name in removed:
        (out / name).unlink(missing_ok=True)
    current = {}
    with contextlib.suppress(ValueError):  # a corrupt manifest: export_all writes a new one
        current = read_manifest(out)
    if isinstance(current.get("source"), dict):
        header = {key: value for key, value in current.items()
                  if key not in ("files", ORT_OPERATORS_ENTRY)}
        update_manifest(out, header, {}, removed=tuple(removed))
    log(f"kvae.export: removed {', '.join(removed)} (converted from the .onnx files this export "
        "replaces; " + ("--ort converts the new ones)" if reconverted else
                        "export again with --ort to convert the new ones)"))
    return removed


def export_ort(run: Run, out: str | Path | None = None,
               quantize: tuple[str, ...] = QUANTIZED) -> dict:
    """Converts the folder's .onnx files to ORT format and merges them into the manifest.

    Each `<half>[.<precision>].onnx` (float32 and `quantize`) becomes `<half>[.<precision>].ort`
    through onnxruntime's converter (`onnxruntime.tools.convert_onnx_models_to_ort`, style
    ORT_STYLE, level ORT_LEVEL[precision]); it is run through kvae.sessions and compared with
    Keras under the .onnx bounds (quantized files get their own NLL change) before it gets its
    final name, as every exported file (kvae.export.export_all). Then ORT_OPERATORS lists the
    operators and types every .ort file of the folder needs, named in the manifest's header
    under ORT_OPERATORS_ENTRY. The .onnx files are only read.

    Raises:
      KVAEError: an .onnx file is missing, a conversion failed, or a file failed its self-check.
    """
    import onnxruntime

    out = Path(out) if out else run.path / "export"
    listed = read_manifest(out).get("files", {})

    def write(half: str, precision: str, path: Path, tmp: Path) -> dict:
        source = filename(half, precision, "onnx")
        onnx_entry = listed.get(source)
        if onnx_entry is None or not (out / source).is_file():
            raise KVAEError(f"{out / source} is missing or not in its manifest: export to ONNX first")
        data = ort_bytes(out / source, tmp, ORT_LEVEL[precision])
        with written_file(path, data) as written:
            check = check_file(written, run, half, precision, path.name)
            extra = {key: onnx_entry[key] for key in ("quantization", "int8_types") if key in onnx_entry}
            if precision != "fp32":
                extra.update(nll_of_file(run, half, written, 256, p_range=iwae.p_range(
                    precision, onnx_entry.get("quantization"))))
            converted = {"source": source, "source_sha256": onnx_entry["sha256"],
                         "optimization_level": ORT_LEVEL[precision], "optimization_style": ORT_STYLE,
                         "onnxruntime": onnxruntime.__version__}
            return file_entry(written, run, half, ORT_FORMAT, precision, check, batch="dynamic",
                              opset=OPSET, ort=converted, **extra)

    manifest = export_all(run, out, ORT_FORMAT, quantize, write)
    # every .ort file of the folder, this export's and an earlier one's (of the same Keras files)
    models = sorted(name for name, entry in manifest["files"].items() if entry["format"] == ORT_FORMAT)
    try:
        operators = write_operator_config(out, models)
    except OSError as e:
        raise KVAEError(f"cannot write to {out}: {describe_os_error(e)}") from None
    log(f"kvae.export: wrote {ORT_OPERATORS} (the operators and types of {', '.join(models)}, "
        "for a reduced onnxruntime build)")
    return update_manifest(out, {**manifest_header(run), ORT_OPERATORS_ENTRY: operators}, {})


def ort_bytes(source: Path, folder: Path, level: str) -> bytes:
    """The ORT-format bytes of the .onnx file `source`, by onnxruntime's converter at `level`
    (its level names: disable, basic, extended, layout, all), converted in `folder`."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (OptimizationStyle,
                                                              convert_onnx_models_to_ort)

    work = Path(tempfile.mkdtemp(prefix=f"{source.stem}-", dir=folder))
    model = work / source.name
    model.write_bytes(source.read_bytes())
    variable = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"  # the converter's level knob
    saved = os.environ.get(variable)
    os.environ[variable] = level
    try:
        with quiet():
            convert_onnx_models_to_ort(model, output_dir=work / "ort",
                                       optimization_styles=[OptimizationStyle[ORT_STYLE]])
    except Exception as e:
        raise KVAEError(f"{source.name}: conversion to ORT format failed: {first_line(e)}") from None
    finally:
        if saved is None:
            del os.environ[variable]
        else:
            os.environ[variable] = saved
    converted = sorted((work / "ort").glob("*.ort"))
    if len(converted) != 1:
        raise KVAEError(f"{source.name}: onnxruntime's converter wrote {len(converted)} .ort files")
    return converted[0].read_bytes()


def write_operator_config(out: Path, models: list[str]) -> dict:
    """out/ORT_OPERATORS: the operators and types of the .ort files `models` (onnxruntime's
    create_config_from_models with type reduction), for a reduced build
    (`--include_ops_by_config`, `--enable_reduced_operator_type_support`). Returns its manifest
    entry."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    with tempfile.TemporaryDirectory(prefix="kvae-ort-config-") as tmp:
        config = Path(tmp) / ORT_OPERATORS
        with quiet():
            create_config_from_models([out / m for m in models], config, enable_type_reduction=True)
        # the header lists the models by their full paths: by file name here (the same bytes anywhere)
        lines = [f"# - {Path(line[4:].strip()).name}" if line.startswith("# - ") else line
                 for line in config.read_text().splitlines()]
        with written_file(out / ORT_OPERATORS, ("\n".join(lines) + "\n").encode()):
            pass
    return {"file": ORT_OPERATORS, "sha256": sha256(out / ORT_OPERATORS), "models": models,
            "type_reduction": True}


def _onnx_model(run: Run, half: str):
    """Keras half -> onnx.ModelProto (opset 17), I/O named by the contract, batch dim `batch`."""
    import tensorflow as tf
    import tf2onnx

    model = run.encoder if half == "encoder" else run.decoder
    shapes = {INPUT[half]: run.image_shape if half == "encoder" else (run.latent_dim,),
              CONDITION: (run.num_classes,)}
    names = run.input_names(half)
    spec = [tf.TensorSpec((None, *shapes[name]), tf.float32, name=name) for name in names]

    @tf.function(input_signature=spec)
    def fn(*args):
        out = model(list(args) if len(args) > 1 else args[0], training=False)
        return {"loc": out[0], "scale": out[1]} if half == "encoder" else {"x_mean": out}

    try:
        with quiet():
            proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET)
    except Exception as e:
        raise KVAEError(f"ONNX conversion of the {half} failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[-1][:300]}") from None
    return _contract_names(proto, half, names)


def _contract_names(proto, half: str, names: tuple[str, ...]):
    """Renames graph inputs/outputs to the contract's names and their batch dim to `batch`."""
    graph = proto.graph
    wanted_in, wanted_out = list(names), list(OUTPUTS[half])
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

    def __init__(self, feeds: dict[str, np.ndarray]):
        self.feeds, self.i = feeds, 0
        self.n = len(next(iter(feeds.values())))

    def get_next(self):
        if self.i >= self.n:
            return None
        self.i += 1
        return {name: rows[self.i - 1:self.i] for name, rows in self.feeds.items()}

    def rewind(self):
        self.i = 0


def _quantize_onnx(proto, half: str, method: str, calibration: dict, folder: Path):
    """int8 ONNX (U8U8, see INT8_TYPES): `static` (QDQ, calibrated) or `dynamic` (weights uint8,
    activations at run time)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quant_pre_process, quantize_dynamic, quantize_static)

    src = folder / f"{half}.fp32.onnx"
    pre = folder / f"{half}.pre.onnx"
    dst = folder / f"{half}.{method}.onnx"
    onnx.save(proto, src)
    with quiet():
        quant_pre_process(src, pre, skip_symbolic_shape=False)
        if method == "static":
            reader = type("Reader", (_Reader, CalibrationDataReader), {})(calibration)
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
    y = ", y (batch, num_classes)" if run.num_classes else ""
    proto.doc_string = (f"kvae {half} ({precision}): " +
                        (f"x (batch, H, W, C) in [0, 1]{y} -> loc, scale (batch, latent_dim)"
                         if half == "encoder" else f"z (batch, latent_dim){y} -> x_mean (batch, H, W, C)"))
    return proto


def _check_onnx(path: Path, run: Run, half: str, precision: str, name: str) -> dict:
    """onnx.checker (full), then kvae.export_checks.check_file (onnxruntime through kvae.sessions)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise KVAEError(f"{name}: self-check failed: onnx.checker: {first_line(e)}") from None
    return check_file(path, run, half, precision, name)


def _onnx_int8(fp32, run: Run, half: str, calibration: dict, folder: Path,
               int8: str = "best") -> tuple:
    """Static-QDQ and dynamic int8 candidates, one kept by `best_int8`."""

    def build(method: str):
        proto = _quantize_onnx(fp32, half, method, calibration, folder)
        path = folder / f"{half}.{method}.checked.onnx"
        data = proto.SerializeToString()
        path.write_bytes(data)
        return proto, len(data), lambda images: nll_of_file(run, half, path, 256, images=images,
                                                            p_range=iwae.p_range("int8", method))

    proto, extra = best_int8("ONNX", half, int8, build)
    return proto, {**extra, "int8_types": INT8_TYPES["onnx", extra["quantization"]]}
