"""ONNX export: Keras half -> `tf2onnx.convert.from_function`, opset 17, batch dim named `batch`.

    python export/to_onnx.py RUN [--quantize fp16 int8] [--int8 best]

- fp16: float16 weights, each followed by a Cast to float32 (float32 I/O and arithmetic, half
  the size, runs on every onnxruntime build).
- int8: onnxruntime's static QDQ (calibrated on the run's training images / z) or dynamic
  quantization, both with uint8 weights and activations (INT8_TYPES in kvae.export_checks says
  why); `best` builds both and keeps one (kvae.export_checks.best_int8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvae import iwae
from kvae.contract import CONDITION, INPUT, OUTPUTS, QUANTIZED, set_onnx_metadata
from kvae.errors import KVAEError
from kvae.export import Run, export_all, file_entry, load_run, metadata, quiet, written_file
from kvae.export_checks import INT8_TYPES, best_int8, check_file, methods, nll_of_file
from kvae.sessions import first_line

OPSET = 17


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

    methods(int8)  # a bad value fails before any work
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
            calibration = run.feeds(half, "calibration")
            proto, extra = _onnx_int8(fp32, run, half, calibration, tmp, int8)
        proto = _finish_onnx(proto, run, half, precision, extra.get("quantization"))
        with written_file(path, proto.SerializeToString()) as written:
            check = _check_onnx(written, run, half, precision, path.name)
            if precision == "fp16":
                extra = nll_of_file(run, half, written, 256)
            return file_entry(written, run, half, "onnx", precision, check, batch="dynamic",
                              opset=OPSET, **extra)

    return export_all(run, out, "onnx", quantize, write)


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
