"""The run folder on disk, as the tools that read it see it: what makes a folder a finished run,
loading its `.keras` files safely, and its `metrics.json`.

`python -m kvae.fit --out RUN` writes the folder (docs/design.md, "The run folder"); kvae.evaluate,
the export scripts and the benchmarks read it through this module, so each check and each
message exists once. Keras is imported only when a model is loaded.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable

from kvae.errors import KVAEError
from kvae.files import atomic_write_json, read_json_object

CONFIG = "config.json"
METRICS = "metrics.json"
RESUME = "python -m kvae.fit --resume --out RUN"


def check_run(run: str | Path, needs: tuple[str, ...] = ()) -> Path:
    """RUN as a Path, if it is a run folder holding every file in `needs` (e.g. "vae.keras").

    Raises:
      KVAEError: no such folder, no config.json (not a run), or a model file missing (its
        training has not finished).
    """
    run = Path(run)
    if not run.is_dir():
        raise KVAEError(f"no such run folder: {run} (train one with python -m kvae.fit --out {run})")
    if not (run / CONFIG).is_file():
        raise KVAEError(f"{run} is not a run folder (no {CONFIG}); train one with python -m kvae.fit")
    for name in needs:
        if not (run / name).is_file():
            raise KVAEError(f"{run} has no {name}: its training has not finished (continue it with "
                            f"{RESUME})")
    return run


def read_config(run: str | Path):
    """RUN/config.json as a kvae.config.Config."""
    from kvae.config import Config

    return Config.from_run(Path(run) / CONFIG)


def load_keras(path: str | Path, loader: Callable | None = None):
    """A `.keras` file of a run, loaded with Keras' safe mode (no Lambda layers, no pickles).

    Args:
      loader: path -> model (default: keras.saving.load_model, safe_mode=True, compile=False).

    Raises:
      KVAEError: the file is truncated, corrupt or holds unsafe layers (one line, with the
        command that writes it again).
    """
    path = Path(path)
    again = f"write it again with python -m kvae.fit --resume --out {path.parent}"
    if not zipfile.is_zipfile(path):  # Keras would say "File not found"
        raise KVAEError(f"{path} is not a complete .keras file (truncated or corrupt): {again}")
    if loader is None:
        import keras

        def loader(p):
            return keras.saving.load_model(p, safe_mode=True, compile=False)
    try:
        return loader(path)
    except Exception as e:  # a corrupt .keras file, or one with unknown (unsafe) layers
        text = (str(e).strip().splitlines() or [""])[0][:200]
        raise KVAEError(f"cannot load {path}: {type(e).__name__}: {text} ({again})") from None


def read_metrics(run: str | Path) -> dict:
    """RUN/metrics.json as a dict ({} if there is none)."""
    try:
        return read_json_object(Path(run) / METRICS)
    except ValueError as e:
        raise KVAEError(f"{e} (fix it or delete it)") from None


def merge_metrics(run: str | Path, values: dict, holder: str = "kvae.evaluate") -> None:
    """Merges `values` into RUN/metrics.json (atomically, under RUN's lock: no merge is lost)."""
    from kvae.runlock import run_lock

    with run_lock(run, holder):
        atomic_write_json(Path(run) / METRICS, {**read_metrics(run), **values})
