"""TFLite (LiteRT) export: Keras half -> SavedModel -> TFLiteConverter, builtin ops only.

    python export/to_tflite.py RUN [--quantize fp16 int8] [--int8 best] [--fixed-batch 1 64]

- The SavedModel comes from `keras.export.ExportArchive`; `from_concrete_functions` is never used:
  it writes weightless files whose output is NaN (docs/design.md, "Toolchain facts").
- fp16: float16 weights. int8: full integer (`static`, calibrated on the run's training images /
  z, float32 I/O) or dynamic range (`dynamic`: int8 weights, float activations); `best` builds
  both and keeps one (kvae.export_checks.best_int8).
- Every file has `serving_default` (dynamic batch) and fixed-batch signatures `batch<N>`
  (FIXED_BATCHES by default) sharing one copy of the weights: XNNPACK cannot take a
  Conv2DTranspose whose output shape is computed at run time, so a fixed signature is the
  conv decoder's fast path (kvae.sessions plans calls through it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvae import iwae
from kvae.contract import CONDITION, INPUT, QUANTIZED, add_tflite_metadata
from kvae.errors import KVAEError
from kvae.export import Run, export_all, file_entry, load_run, metadata, quiet, written_file
from kvae.export_checks import INT8_TYPES, best_int8, check_file, methods, nll_of_file

FIXED_BATCHES = (1,)  # fast-path signatures `batch<N>` next to the dynamic serving_default


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
    methods(int8)  # a bad value fails before any work
    run = run if isinstance(run, Run) else load_run(run)
    fixed_batches = tuple(sorted({int(b) for b in fixed_batches if int(b) > 0}))
    savedmodels = {}

    def write(half: str, precision: str, path: Path, tmp: Path) -> dict:
        if half not in savedmodels:
            savedmodels[half] = _savedmodel(run, half, tmp / half, fixed_batches)
        keys = savedmodels[half]
        calibration = run.feeds(half, "calibration")
        values = metadata(run, half, precision)
        if precision == "int8":
            data, extra = _tflite_int8(run, half, tmp / half, keys, calibration, tmp, int8)
            values["quantization"] = extra["quantization"]
        else:
            data = _tflite_bytes(tmp / half, keys, precision, calibration)
            extra = {}
        data = add_tflite_metadata(data, values)
        with written_file(path, data) as written:
            check = check_file(written, run, half, precision, path.name, keys)
            if precision == "fp16":
                extra = _nll_of_tflite(run, half, written, keys)
            signatures = {k: "dynamic" if k == "serving_default" else int(k[len("batch"):]) for k in keys}
            return file_entry(written, run, half, "tflite", precision, check, batch="dynamic",
                              signatures=signatures, **extra)

    return export_all(run, out, "tflite", quantize, write)


def _savedmodel(run: Run, half: str, folder: Path, fixed_batches: tuple[int, ...]) -> list[str]:
    """Writes a SavedModel with `serving_default` (dynamic batch) and `batch<N>` signatures (a
    conditional model's take y after x / z)."""
    import keras
    import tensorflow as tf

    model = run.encoder if half == "encoder" else run.decoder
    shapes = {INPUT[half]: run.image_shape if half == "encoder" else (run.latent_dim,),
              CONDITION: (run.num_classes,)}
    archive = keras.export.ExportArchive()
    archive.track(model)
    keys = []
    for batch in (None, *fixed_batches):
        def fn(*args):
            out = model(list(args) if len(args) > 1 else args[0], training=False)
            return {"loc": out[0], "scale": out[1]} if half == "encoder" else {"x_mean": out}
        key = "serving_default" if batch is None else f"batch{batch}"
        archive.add_endpoint(key, fn, input_signature=[
            tf.TensorSpec((batch, *shapes[name]), tf.float32, name=name)
            for name in run.input_names(half)])
        keys.append(key)
    try:
        with quiet():
            archive.write_out(str(folder), verbose=False)
    except tf.errors.OpError as e:  # e.g. a full disk where the temporary SavedModel goes
        reason = e.message.split(";")[-1].split("[Op:")[0].strip()
        raise KVAEError(f"cannot write the {half}'s temporary SavedModel in {folder.parent}: {reason} "
                        "(free disk space there, or point TMPDIR at a folder with room)") from None
    return keys


def _nll_of_tflite(run: Run, half: str, path: Path, keys: list[str], images: str = "held_out",
                   p_range: tuple[float, float] = iwae.P_FLOAT32) -> dict:
    """nll_of_file for a .tflite file, row by row through `batch1` when it has one (fastest)."""
    signature = "batch1" if "batch1" in keys else "serving_default"
    return nll_of_file(run, half, path, 1 if signature == "batch1" else 64, signature, images, p_range)


def _tflite_int8(run: Run, half: str, savedmodel: Path, keys: list[str], calibration: dict,
                 folder: Path, int8: str = "best") -> tuple[bytes, dict]:
    """Full-integer (`static`: calibrated int8 activations) and dynamic-range (`dynamic`: int8
    weights, float activations) candidates, one kept by `best_int8`.
    Full-integer is the faster one, but it quantizes the decoder's sigmoid output to steps of
    1/256, which costs NLL on confident pixels."""

    def build(method: str):
        data = _tflite_bytes(savedmodel, keys, "int8", calibration, method)
        path = folder / f"{half}.{method}.tflite"
        path.write_bytes(data)
        return data, len(data), lambda images: _nll_of_tflite(run, half, path, keys, images,
                                                              iwae.p_range("int8", method))

    data, extra = best_int8("TFLite", half, int8, build)
    return data, {**extra, "int8_types": INT8_TYPES["tflite", extra["quantization"]]}


def _tflite_bytes(savedmodel: Path, keys: list[str], precision: str, calibration: dict,
                  method: str = "static") -> bytes:
    """Converts a SavedModel to a .tflite flatbuffer, builtin ops only.

    int8 `method`: `static` = full integer, calibrated on `calibration` (input name -> rows);
    `dynamic` = int8 weights with float activations (dynamic-range quantization, no calibration).
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
                n = len(next(iter(calibration.values())))
                for start in range(0, n, batch):
                    yield key, {name: np.take(v, range(start, start + batch), axis=0, mode="wrap")
                                for name, v in calibration.items()}

        converter.representative_dataset = representative
    try:
        with quiet():
            return converter.convert()
    except Exception as e:
        raise KVAEError(f"TFLite conversion ({precision}) failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[-1][:300]}") from None
