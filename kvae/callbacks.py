"""Callbacks of a training run: KL warm-up and the crash-safe, resumable run state."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from pathlib import Path

import keras

from kvae.config import Config
from kvae.errors import KVAEError, signals_deferred
from kvae.files import atomic_path, atomic_write_text

STATE = "state"  # sub-folder of the run folder with the resume state
PROGRESS = "progress.json"  # the commit point of an epoch: written last
KEEP = 2  # checkpoints kept: the last two epochs (with the best epoch each of them names)


class KLWarmup(keras.callbacks.Callback):
    """Ramps the posterior's beta linearly over the first `epochs` epochs (0 = off)."""

    def __init__(self, posterior, beta: float, epochs: int):
        super().__init__()
        self.posterior, self.beta, self.epochs = posterior, beta, epochs

    @classmethod
    def of(cls, posterior, config) -> "KLWarmup":
        """The run's warm-up: config's beta and ramp (resolved), the ramp ending by the last epoch
        even in runs shorter than it."""
        return cls(posterior, config.resolved_beta, min(config.resolved_kl_warmup, config.resolved_epochs))

    def on_epoch_begin(self, epoch, logs=None):
        weight = min(1.0, (epoch + 1) / self.epochs) if self.epochs else 1.0
        self.posterior.beta.assign(self.beta * weight)


class RunState(keras.callbacks.Callback):
    """Saves each finished epoch (weights + optimizer + eps counter, history, best epoch).

    On disk, per epoch: `state/epoch-NNNN.weights.h5`, then `history.csv`, then the epoch's
    checkpoint record `state/epoch-NNNN.json` (epochs done, best epoch, logs, and the sha256 of
    the weights files it needs), then `state/progress.json` (a copy of the record: the commit
    point). A crash anywhere leaves the previous epoch's complete state; SIGINT / SIGTERM wait for
    a commit that has begun. `restore` truncates history.csv to the committed epochs.
    history.csv has a column `lr`: the learning rate of the epoch's first step, as the optimizer
    computes it.

    The last KEEP checkpoints are kept (their records and the weights they name: their own and
    their best epoch's). A damaged latest checkpoint (a truncated weights file or record, a
    truncated progress.json: a full disk, a power cut) makes `restore` fall back to the previous
    intact one, which it says in one line; with none intact it raises KVAEError, and never
    trains from a half-read state.
    """

    def __init__(self, out: Path, config: Config):
        super().__init__()
        self.out, self.config = out, config
        (out / STATE).mkdir(parents=True, exist_ok=True)
        self.epochs_done = 0
        self.best_epoch, self.best_val_loss = -1, math.inf
        self.train_seconds = 0.0
        self.last_logs: dict = {}
        self.nan_epoch: int | None = None
        self.history: list[dict] = []
        self.lr = math.nan  # of the current epoch's first step
        self.weights: dict[str, str] = {}  # weights file -> sha256, of the latest checkpoint
        self.seed_states: list[list] = []  # Dropout / GaussianNoise seed states (not in the weights)
        self.previous_weights: dict[str, str] = {}  # ... of the checkpoint before it

    def weights_path(self, epoch: int) -> Path:
        return self.out / STATE / f"epoch-{epoch + 1:04d}.weights.h5"

    def record_path(self, epoch: int) -> Path:
        return self.out / STATE / f"epoch-{epoch + 1:04d}.json"

    def restore(self, vae, source: Path | None = None) -> int:
        """Loads the last intact committed epoch (of `source`, default this run) into `vae`.

        Tries progress.json, then the older checkpoint records, newest first; a checkpoint is
        intact when its record reads, its weights files have the recorded sha256 and load, and
        history.csv holds its epochs. Falling back is said in one line.

        Returns:
          How many epochs are done.

        Raises:
          KVAEError: resume state exists but no checkpoint of it is intact.
        """
        source = source or self.out
        folder = source / STATE
        records = sorted(folder.glob("epoch-*.json"), key=_epoch_of, reverse=True)
        if not (folder / PROGRESS).exists() and not records:
            return 0
        damaged: list[str] = []  # what is wrong, newest first
        candidates: list[tuple[str, dict]] = []
        committed = math.inf
        try:
            progress = _read_record(folder / PROGRESS)
            candidates.append((PROGRESS, progress))
            committed = progress["epochs_done"]
        except ValueError as e:
            damaged.append(f"{STATE}/{PROGRESS} {e}")
        for path in records:
            if _epoch_of(path) >= committed:  # the same as progress.json, or never committed
                continue
            try:
                candidates.append((path.name, _read_record(path)))
            except ValueError as e:
                damaged.append(f"{STATE}/{path.name} {e}")
        try:
            history, history_error = _read_history(source / "history.csv"), None
        except (OSError, ValueError, csv.Error) as e:
            history, history_error = [], f"cannot be read ({e})"
        for name, record in candidates:
            problem = self._load(vae, source, record, history, history_error)
            if problem is None:
                break
            damaged.append(problem)
        else:
            raise KVAEError(f"--resume: the resume state in {folder} is damaged: "
                            f"{'; '.join(damaged) or 'no checkpoint record'}; no earlier "
                            "checkpoint is intact, so the run cannot continue: start it again "
                            f"(move {source} away or choose another --out)")
        self.epochs_done = record["epochs_done"]
        self.best_epoch, self.best_val_loss = record["best_epoch"], record["best_val_loss"]
        self.train_seconds, self.last_logs = record["train_seconds"], record["last_logs"]
        self.weights = dict(record.get("weights", {}))
        self.seed_states = list(record.get("seed_states", []))
        self.previous_weights = self._previous_weights(folder, self.epochs_done)
        if self.epochs_done and self.config.lr_schedule == "constant":
            vae.optimizer.learning_rate = self.config.lr  # the weights file holds the old run's --lr
        self.history = history[: self.epochs_done]
        if damaged:
            print(f"kvae.fit: {'; '.join(damaged)}; resuming from the newest intact checkpoint: "
                  f"epoch {self.epochs_done} (the epochs after it are trained again)", flush=True)
            if source == self.out:
                self._forget_after(self.epochs_done)
        self._write_history()
        if damaged and source == self.out:
            self.save_progress()  # progress.json names the checkpoint used again
        return self.epochs_done

    def _load(self, vae, source: Path, record: dict, history: list[dict],
              history_error: str | None) -> str | None:
        """Loads a checkpoint's weights into `vae`; None if it is intact, else what is wrong.
        A checkpoint that fails to load half-way is overwritten by the next one that loads."""
        n = record["epochs_done"]
        if n == 0:  # stopped (NaN) before its first epoch was saved
            return None
        if history_error is not None:
            return f"history.csv {history_error}"
        if [row["epoch"] for row in history[:n]] != list(range(1, n + 1)):
            return f"history.csv does not hold epochs 1-{n} of checkpoint {n} (cut short or damaged)"
        for name, digest in record.get("weights", {}).items():  # the latest epoch's and the best's
            path = source / STATE / name
            if not path.exists():
                return f"{STATE}/{name} is missing"
            if digest != _sha256(path):
                return f"{STATE}/{name} is damaged (truncated or changed: its sha256 is not the one recorded)"
        name = self.weights_path(n - 1).name
        try:
            vae.load_weights(source / STATE / name)
        except Exception as e:  # a run from before the records (no sha256): h5py's errors
            text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            return f"{STATE}/{name} cannot be loaded ({text})"
        set_seed_states(vae, record.get("seed_states", []))
        return None

    def _previous_weights(self, folder: Path, epochs_done: int) -> dict[str, str]:
        try:
            return dict(_read_record(folder / f"epoch-{epochs_done - 1:04d}.json").get("weights", {}))
        except ValueError:
            return {}

    def _forget_after(self, epochs_done: int) -> None:
        """Deletes the (damaged or uncommitted) state of epochs after `epochs_done`."""
        for path in (self.out / STATE).glob("epoch-*"):
            if _epoch_of(path) > epochs_done:
                path.unlink(missing_ok=True)

    def on_epoch_begin(self, epoch, logs=None):
        self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if not all(math.isfinite(v) for v in logs.values()):
            self.nan_epoch = epoch
            self.model.stop_training = True
            return
        with signals_deferred():  # SIGINT / SIGTERM: after the commit, never half-way
            self._commit(epoch, logs)

    def _commit(self, epoch: int, logs: dict) -> None:
        path = self.weights_path(epoch)
        with atomic_path(path) as tmp:
            self.model.save_weights(tmp)
            digest = _sha256(tmp)
        self.history.append({"epoch": epoch + 1, **logs, "lr": self.lr})
        self._write_history()
        # The best epoch by the full-beta objective: during KL warm-up val_loss uses a smaller beta
        # and would favour the early, under-regularized epochs.
        if "val_reconstruction_loss" in logs and "val_kl_loss" in logs:
            val_loss = logs["val_reconstruction_loss"] + self.config.resolved_beta * logs["val_kl_loss"]
        else:
            val_loss = logs.get("val_loss", logs.get("loss"))
        if val_loss < self.best_val_loss:
            self.best_epoch, self.best_val_loss = epoch, val_loss
        best = self.weights_path(self.best_epoch).name
        self.previous_weights = self.weights
        self.weights = {path.name: digest}
        if best != path.name:
            self.weights[best] = self.previous_weights.get(best, "")  # "": from before the records
        self.weights = {name: d for name, d in self.weights.items() if d}
        self.epochs_done, self.last_logs = epoch + 1, logs
        self.seed_states = seed_states(self.model)
        self.save_progress()
        kept_epochs = range(epoch + 2 - KEEP, epoch + 2)
        kept = {*self.weights, *self.previous_weights, best}
        for old in (self.out / STATE).glob("epoch-*"):
            if old.name.endswith(".json") and _epoch_of(old) not in kept_epochs:
                old.unlink(missing_ok=True)
            elif old.name.endswith(".weights.h5") and old.name not in kept:
                old.unlink(missing_ok=True)

    def save_progress(self):
        """Writes the checkpoint record of the last finished epoch, then progress.json."""
        progress = {"epochs_done": self.epochs_done, "best_epoch": self.best_epoch,
                    "best_val_loss": self.best_val_loss, "train_seconds": self.train_seconds,
                    "last_logs": self.last_logs, "weights": self.weights}
        if self.seed_states:
            progress["seed_states"] = self.seed_states
        text = json.dumps(progress, indent=2) + "\n"
        if self.epochs_done:
            atomic_write_text(self.record_path(self.epochs_done - 1), text)
        atomic_write_text(self.out / STATE / PROGRESS, text)

    def _write_history(self):
        if not self.history:
            return
        buffer = io.StringIO()
        # all columns of all rows: a run from before a column existed resumes with it empty
        columns = list(dict.fromkeys(k for row in self.history for k in row))
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.out / "history.csv", buffer.getvalue())


def _read_history(path: Path) -> list[dict]:
    """history.csv's rows up to the first incomplete one (a truncated file keeps its start)."""
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if None in row or None in row.values():  # too many or too few fields: cut off
                break
            try:
                rows.append({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()
                             if v != ""})
            except ValueError:
                break
    return rows


def _read_record(path: Path) -> dict:
    """A checkpoint record (or progress.json); ValueError saying what is wrong with it."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError("is missing") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"is damaged (truncated or unreadable: {e})") from None
    types = {"epochs_done": int, "best_epoch": int, "best_val_loss": (int, float),
             "train_seconds": (int, float), "last_logs": dict}
    if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in types.items()):
        raise ValueError("is damaged (not a complete checkpoint record)")
    if not isinstance(record.get("weights", {}), dict) or record["epochs_done"] < 0:
        raise ValueError("is damaged (not a complete checkpoint record)")
    return record


def _epoch_of(path: Path) -> int:
    """NNNN of state/epoch-NNNN.* (-1 for other names)."""
    match = re.match(r"epoch-(\d+)\.", path.name)
    return int(match.group(1)) if match else -1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seed_states(model) -> list[list]:
    """The states of the model's random-number layers (Dropout, GaussianNoise: Keras
    SeedGenerators), in the model's variable order. `save_weights` leaves them out, so a resumed
    run would draw its masks and noise from the first epoch's stream again; the checkpoint record
    keeps them. (By order, not by name: Keras numbers SeedGenerators process-wide.)"""
    return [keras.ops.convert_to_numpy(v).tolist() for v in _seed_variables(model)]


def set_seed_states(model, states: list[list]) -> None:
    """Restores `seed_states` (none recorded: a run from before they were, or without such layers)."""
    variables = _seed_variables(model)
    if states and len(states) != len(variables):
        raise KVAEError(f"the checkpoint records {len(states)} random-layer states, the model has "
                        f"{len(variables)}: it is not this run's model")
    for v, state in zip(variables, states):
        v.assign(keras.ops.convert_to_tensor(state, dtype=v.dtype))


def _seed_variables(model) -> list:
    return [v for v in getattr(model, "variables", ()) if v.path.endswith("seed_generator_state")]
