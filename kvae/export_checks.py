"""The export's self-check: every written file is run through kvae.sessions (the session code
users run) and compared with Keras before it gets its final name, quantized files get their
change in NLL, and the int8 method is chosen.

- `check_file`: the parity inputs (validation images, or z from the prior and the posterior) in
  one call and row by row, and every fixed-batch TFLite signature at its batch with the last call
  padded; a missing output, a wrong shape, a non-finite value or a difference beyond TOLERANCE
  raises KVAEError with the measured number.
- `nll_entry` / `nll_of_file`: the change in IWAE NLL (kvae.iwae) against float32 Keras with
  paired samples: the same images, the same eps, and for a decoder the float32 encoder's
  posterior (for an encoder: its posterior as the proposal, with the float32 decoder).
- `best_int8`: builds both int8 methods and keeps the one whose NLL change is lower on training
  images that calibration did not use; nll_delta is then measured on validation images.

What a check measures is recorded in the manifest (docs/export.md). `run` is a kvae.export.Run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from kvae import iwae
from kvae.contract import CONDITION, INPUT, OUTPUTS
from kvae.errors import KVAEError
from kvae.export import INT8_METHODS, NLL_SEED, log, quiet
from kvae.sessions import Session, first_line

# Self-check bounds on max abs diff against Keras. A file beyond them is not written. float32 is
# absolute (the contract's 1e-5); fp16 and int8 bounds are multiplied by max(1, max |Keras
# output|), since their error grows with the magnitude of loc. fp16 and int8 bounds only catch a
# broken file: a quantized file's quality is its nll_delta. Each file's measured differences are
# in its manifest entry ("parity"); docs/export.md, "Self-checks".
TOLERANCE = {
    "fp32": {"loc": 1e-5, "scale": 1e-5, "x_mean": 1e-5},
    "fp16": {"loc": 1e-2, "scale": 1e-2, "x_mean": 5e-3},
    "int8": {"loc": 0.5, "scale": 0.5, "x_mean": 0.5},
}
# ... and on mean abs diff (int8 only: a few large pixel errors are normal, a shifted image is not;
# a decoder with zeroed weights is off by ~0.3 on average).
MEAN_TOLERANCE = {"int8": {"loc": 0.1, "scale": 0.1, "x_mean": 0.05},
                  "fp16": {"loc": 1e-3, "scale": 1e-3, "x_mean": 1e-3}}


# ----------------------------------------------------------------------------------------------
# Parity with Keras, through the runtime's sessions


def open_session(path: Path, signature: str | None = None, max_batch: int = 256) -> Session:
    """A kvae.sessions.Session on a written file, as the checks run it: 1 thread (robust on a
    shared machine: a second thread that has to wait for a busy core made batch-64 int8 decoding
    25x slower on 2 cores), XNNPACK on, only `signature` (TFLite) when given."""
    with quiet():
        return Session(path, threads=1, max_batch=max_batch,
                       signatures=None if signature is None else (signature,))


def check_file(path: Path, run, half: str, precision: str, name: str,
               keys: list[str] | None = None) -> dict:
    """Runs a written file through kvae.sessions and compares it with Keras (see `parity`).

    Args:
      keys: TFLite: the signatures the file must have (exactly these): `serving_default` is run
        on the parity inputs in one call and row by row; `batch<N>` in calls of N, the last one
        padded (N > 1: one row fewer when N divides the inputs), so a row's outputs are proven
        not to depend on the rows padded after it. ONNX (None): one call and row by row.

    Raises:
      KVAEError: the runtime cannot load or run the file, or `parity` fails.
    """
    feeds = run.feeds(half, "parity")
    reference = run.keras_outputs(half, feeds)
    n = len(feeds[INPUT[half]])
    runtime = "onnxruntime" if keys is None else "LiteRT"
    results = []
    try:
        if keys is not None:
            want = {"inputs": sorted(feeds), "outputs": sorted(OUTPUTS[half])}
            listed = open_session(path, "serving_default").signature_list
            got = {k: {"inputs": sorted(v["inputs"]), "outputs": sorted(v["outputs"])}
                   for k, v in listed.items()}
            if got != {key: want for key in keys}:
                raise KVAEError(f"{name}: self-check failed: signatures {got}, expected {keys} with {want}")
        for key in keys or [None]:
            if key in (None, "serving_default"):
                for calls_of in (n, 1):
                    results.append(open_session(path, key, max_batch=calls_of).run(**feeds))
            else:
                batch = int(key[len("batch"):])
                rows = n - 1 if batch > 1 and n % batch == 0 else n
                results.append(open_session(path, key).run(**{k: v[:rows] for k, v in feeds.items()}))
    except KVAEError as e:
        if str(e).startswith(f"{name}: self-check failed"):
            raise
        raise KVAEError(f"{name}: self-check failed: {e}") from None
    except Exception as e:  # the runtime cannot load or run it
        raise KVAEError(f"{name}: self-check failed: {runtime} cannot run it: {type(e).__name__}: "
                        f"{first_line(e)}") from None
    return parity(half, precision, reference, results, name)


def parity(half: str, precision: str, reference: dict[str, np.ndarray],
           results: list[dict[str, np.ndarray]], filename: str) -> dict:
    """Max and mean abs diff of each run's outputs against Keras; raises if beyond TOLERANCE.

    Args:
      results: outputs of the file for the first rows of the inputs of `reference` (all of them,
        or fewer for a padded fixed-batch signature: as many rows in every output).

    Raises:
      KVAEError: an output is missing, has the wrong shape, is not finite, or differs too much.
    """
    max_diff, mean_diff = {}, {}
    for name in OUTPUTS[half]:
        diffs = []
        for out in results:
            if name not in out:
                raise KVAEError(f"{filename}: self-check failed: output {name!r} missing (got {sorted(out)})")
            rows = len(next(iter(out.values())))
            want = reference[name][:rows]
            if out[name].shape != want.shape or rows == 0:
                raise KVAEError(f"{filename}: self-check failed: output {name!r} has shape "
                                f"{out[name].shape}, Keras gives {want.shape}")
            if not np.all(np.isfinite(out[name])):
                bad = int(np.sum(~np.isfinite(out[name])))
                raise KVAEError(f"{filename}: self-check failed: {bad} of {out[name].size} values "
                                f"of {name!r} are NaN or infinite (a weightless or broken export)")
            diffs.append(np.abs(out[name].astype(np.float64) - want).ravel())
        d = np.concatenate(diffs)
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
# The change in NLL, with paired samples


def nll_entry(run, decode: Callable[[np.ndarray], np.ndarray] | None = None,
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
    x, loc0, scale0, eps, y = run.nll_images(images)
    reference = run.nll_fp32(images)
    nll = iwae.nll(x, loc0 if loc is None else loc, scale0 if scale is None else scale, eps,
                   decode or run.keras_decode(), run.likelihood, run.sigma, p_range, y=y,
                   prior=run.model_prior)
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


def nll_of_file(run, half: str, path: Path, batch: int, signature: str | None = None,
                images: str = "held_out", p_range: tuple[float, float] = iwae.P_FLOAT32) -> dict:
    """nll_entry for a written file run through kvae.sessions in calls of `batch` rows (through
    `signature` for TFLite). Both are recorded: a dynamically quantized file's output depends on
    the other rows of its call."""
    session = open_session(path, signature, max_batch=batch)

    def outputs(inputs: np.ndarray, y: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return session.run(**{INPUT[half]: inputs, **({} if y is None else {CONDITION: y})})

    if half == "decoder":
        entry = nll_entry(run, lambda z, y=None: outputs(z, y)["x_mean"], images=images,
                          p_range=p_range)
    else:
        x, _, _, _, y = run.nll_images(images)
        out = outputs(x, y)
        entry = nll_entry(run, loc=out["loc"], scale=out["scale"], what="encoder", images=images)
    entry["nll"]["batch"] = batch
    if signature:
        entry["nll"]["signature"] = signature
    return entry


# ----------------------------------------------------------------------------------------------
# The int8 method


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


def methods(int8: str) -> tuple[str, ...]:
    """The int8 methods to build for --int8 (`best`: both)."""
    if int8 not in INT8_METHODS:
        raise KVAEError(f"--int8 must be one of {', '.join(INT8_METHODS)}, got {int8!r}")
    return ("static", "dynamic") if int8 == "best" else (int8,)



def best_int8(fmt: str, half: str, int8: str, build: Callable[[str], tuple]) -> tuple:
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
    for method in methods(int8):
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
