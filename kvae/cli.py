"""The command-line side of kvae's errors: every `python -m kvae.*` tool and export script parses
its flags with `ArgumentParser` and runs inside `cli_errors`, so a mistake ends with one line on
stderr and a non-zero exit (2; an interruption 128 + its signal: 130 / 143), never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import sys

from kvae.errors import KVAEError, describe_os_error, kvae_error_inside

TRAIN_EXTRA = 'pip install "kvae[train]"'
# What training imports (import names), per Keras backend: `pip install kvae` is the runtime only
# (numpy, onnxruntime, pillow); the `train` extra adds these. The JAX set is requirements-jax.txt's.
TRAIN_STACK = {
    "tensorflow": ("tensorflow", "keras", "tensorflow_probability", "tf_keras", "mlxtend",
                   "matplotlib", "tqdm"),  # TFP 0.25 refuses to import without tf_keras
    "jax": ("jax", "keras", "tensorflow_probability", "mlxtend", "matplotlib", "tqdm"),
}
# Export always runs under TensorFlow (tf2onnx, the TFLite converter; LiteRT for the self-check).
EXPORT_STACK = (*TRAIN_STACK["tensorflow"], "onnx", "tf2onnx", "ai_edge_litert")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends with one line (no usage dump) and exit code 2."""

    def error(self, message):
        name = self.prog.removeprefix("python -m ").removeprefix("python ")  # as cli_errors says it
        self.exit(2, f"{name}: error: {message} (see {self.prog} --help)\n")


def keras_backend() -> str:
    """The backend Keras will use, without importing it: KERAS_BACKEND, else keras.json's."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return str(json.load(f).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def require_train_stack(prog: str, export: bool = False) -> None:
    """Ends with one line naming `pip install "kvae[train]"` and exit code 2 if what a training
    (or, with `export`, an export) command imports is not installed. Call it before anything
    imports TensorFlow or Keras; it looks the modules up without importing them (milliseconds)."""
    backend = "tensorflow" if export else keras_backend()
    missing = [name for name in (EXPORT_STACK if export else TRAIN_STACK.get(backend, ("keras",)))
               if not _installed(name)]
    if not missing:
        return
    how = f"run {TRAIN_EXTRA}" if backend != "jax" else (
        f"install requirements-jax.txt's JAX stack, or run {TRAIN_EXTRA} for TensorFlow's")
    _fail(prog, f"this command needs the training and export stack, which `pip install kvae` (the "
                f"TensorFlow-free runtime) leaves out (missing: {', '.join(missing)}); {how}")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or blocked package; a module without __spec__
        return False


@contextlib.contextmanager
def cli_errors(prog: str):
    """Turns KVAEError, failed reads/writes (a full disk), running out of memory and Ctrl-C into
    one line on stderr and a non-zero exit, no traceback (an interruption: 128 + its signal)."""
    try:
        yield
    except KVAEError as e:
        _fail(prog, str(e))
    except OSError as e:  # disk full, quota, permissions, read-only file system, bad path
        _fail(prog, describe_os_error(e))
    except MemoryError as e:
        _fail(prog, f"out of memory{': ' + str(e) if str(e) else ''}; try smaller sizes")
    except KeyboardInterrupt as e:  # Ctrl-C, or Interrupted (SIGINT / SIGTERM)
        print(f"{prog}: {getattr(e, 'message', '') or 'interrupted'}", file=sys.stderr, flush=True)
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))
    except Exception as e:
        inside = kvae_error_inside(e)
        if inside is not None:  # raised in a tf.data function (a broken image found mid-training)
            _fail(prog, inside)
        if type(e).__name__ != "ResourceExhaustedError":  # TensorFlow's out-of-memory error
            raise
        text = re.sub(r"\{\{.*?\}\}\s*", "", _first_line(e))  # TF's function-node prefix
        text = text.split(" on /job:")[0].split(" [Op:")[0]
        _fail(prog, f"out of memory: {text} (use a smaller --batch-size, --hidden or --latent-dim)")



def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def _fail(prog: str, message: str) -> None:
    message = " ".join(message.split("\n"))  # one line, whatever the message holds
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)
