"""Callbacks of a training run: KL warm-up and the crash-safe, resumable run state."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import keras

from kvae.config import Config
from kvae.files import atomic_path, atomic_write_text

STATE = "state"  # sub-folder of the run folder with the resume state
PROGRESS = "progress.json"  # the commit point of an epoch: written last


class KLWarmup(keras.callbacks.Callback):
    """Ramps the posterior's beta linearly over the first `epochs` epochs (0 = off)."""

    def __init__(self, posterior, beta: float, epochs: int):
        super().__init__()
        self.posterior, self.beta, self.epochs = posterior, beta, epochs

    def on_epoch_begin(self, epoch, logs=None):
        weight = min(1.0, (epoch + 1) / self.epochs) if self.epochs else 1.0
        self.posterior.beta.assign(self.beta * weight)


class RunState(keras.callbacks.Callback):
    """Saves each finished epoch (weights + optimizer + eps counter, history, best epoch).

    On disk, per epoch: `state/epoch-NNNN.weights.h5`, then `history.csv`, then
    `state/progress.json` (the commit point). A crash anywhere leaves the previous epoch's
    complete state; `restore` truncates history.csv to the committed epochs. history.csv has a
    column `lr`: the learning rate of the epoch's first step, as the optimizer computes it.
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

    def weights_path(self, epoch: int) -> Path:
        return self.out / STATE / f"epoch-{epoch + 1:04d}.weights.h5"

    def restore(self, vae, source: Path | None = None) -> int:
        """Loads the last committed epoch (of `source`, default this run) into `vae`.

        Returns how many epochs are done.
        """
        source = source or self.out
        path = source / STATE / PROGRESS
        if not path.exists():
            return 0
        progress = json.loads(path.read_text())
        self.epochs_done = progress["epochs_done"]
        self.best_epoch, self.best_val_loss = progress["best_epoch"], progress["best_val_loss"]
        self.train_seconds = progress["train_seconds"]
        self.last_logs = progress["last_logs"]
        if self.epochs_done == 0:  # stopped (NaN) before its first epoch was saved
            return 0
        vae.load_weights(source / STATE / self.weights_path(self.epochs_done - 1).name)
        if self.config.lr_schedule == "constant":  # the weights file holds the old run's --lr
            vae.optimizer.learning_rate = self.config.lr
        self.history = _read_history(source / "history.csv")[: self.epochs_done]
        self._write_history()
        return self.epochs_done

    def on_epoch_begin(self, epoch, logs=None):
        self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if not all(math.isfinite(v) for v in logs.values()):
            self.nan_epoch = epoch
            self.model.stop_training = True
            return
        with atomic_path(self.weights_path(epoch)) as tmp:
            self.model.save_weights(tmp)
        self.history.append({"epoch": epoch + 1, **logs, "lr": self.lr})
        self._write_history()
        # The best epoch by the full-beta objective: during KL warm-up val_loss uses a smaller beta
        # and would favour the early, under-regularized epochs.
        if "val_reconstruction_loss" in logs and "val_kl_loss" in logs:
            val_loss = logs["val_reconstruction_loss"] + self.config.beta * logs["val_kl_loss"]
        else:
            val_loss = logs.get("val_loss", logs.get("loss"))
        if val_loss < self.best_val_loss:
            self.best_epoch, self.best_val_loss = epoch, val_loss
        self.epochs_done, self.last_logs = epoch + 1, logs
        self.save_progress()
        for old in (self.out / STATE).glob("epoch-*.weights.h5"):  # keep the last and the best
            if old not in (self.weights_path(epoch), self.weights_path(self.best_epoch)):
                old.unlink(missing_ok=True)

    def save_progress(self):
        progress = {"epochs_done": self.epochs_done, "best_epoch": self.best_epoch,
                    "best_val_loss": self.best_val_loss, "train_seconds": self.train_seconds,
                    "last_logs": self.last_logs}
        atomic_write_text(self.out / STATE / PROGRESS, json.dumps(progress, indent=2) + "\n")

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
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""}
                for row in csv.DictReader(f)]
