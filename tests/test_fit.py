"""python -m kvae.fit: the run folder, determinism, resume (after SIGKILL, with a new --lr or more
--epochs), and bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from kvae.fit import main

TINY = ["--latent-dim", "4", "--hidden", "32", "--batch-size", "64", "--val-size", "64",
        "--eval-k", "5"]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """1,000 real MNIST digits as an .npz: fast epochs for the CLI tests."""
    from kvae.data import _mnist_5k

    x, y = _mnist_5k()
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=x[:1000, :, :, 0], y=y[:1000])
    return str(path)


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "kvae.fit", *args], capture_output=True,
                          text=True, **kwargs)


def weights(path: Path) -> dict:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None)
    return out


@pytest.fixture(scope="module")
def cli_run(uninterrupted_run):
    """conftest's uninterrupted_run (`python -m kvae.fit` on 500 digits for 6 epochs, eval k 5):
    (folder, exit status, output). The run folder the CLI test checks, and the uninterrupted run
    the SIGKILL test compares with (tests/test_crash_safety.py's too)."""
    return uninterrupted_run.done()


def test_cli_writes_the_complete_run_folder(cli_run):
    from PIL import Image

    run, code, output = cli_run
    assert code == 0, output[-3000:]
    assert "Epoch 6/6" in output
    for name in ("config.json", "vae.keras", "encoder.keras", "decoder.keras", "history.csv",
                 "metrics.json", "samples.png", "reconstructions.png"):
        assert (run / name).stat().st_size > 0, name
    assert json.loads((run / "config.json").read_text())["latent_dim"] == 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 6 and metrics["eval"]["k"] == 5
    assert metrics["eval"]["nll"] <= metrics["eval"]["neg_elbo"] + 1.0
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,")
    assert [r.split(",")[0] for r in history[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert "val_loss" in history[0] and "kl_loss" in history[0]
    for png in ("samples.png", "reconstructions.png"):
        with Image.open(run / png) as im:
            im.verify()
    assert any((run / "logs").rglob("events.out.tfevents*"))  # TensorBoard
    assert not list(run.rglob(".tmp-*"))  # no temporary files left behind


def test_one_epoch_lowers_the_loss(tiny_npz, tmp_path):
    import keras

    from kvae import data as kdata
    from kvae.config import Config
    from kvae.fit import fit
    from kvae.model import build_vae

    config = Config(dataset=tiny_npz, out=str(tmp_path / "r"), epochs=1, latent_dim=4, hidden=32,
                    batch_size=64, val_size=64, eval_k=0)
    d = kdata.load(tiny_npz, val_size=64)
    keras.utils.set_random_seed(config.seed)
    untrained = build_vae(config, d.image_shape)
    untrained.compile()
    before = untrained.evaluate(kdata.eval_dataset(d.x_val, 64, "dynamic"), verbose=0, return_dict=True)
    fit(config)
    history = (tmp_path / "r" / "history.csv").read_text().splitlines()
    after = float(history[1].split(",")[history[0].split(",").index("val_loss")])
    assert after < before["loss"] - 20  # measured: 543 -> 498 nats after one 14-step epoch


# `python -m kvae.fit ARGS` that pauses in the middle of epoch 3 (its first 2 epochs committed) and
# says so: the test kills it then, on a fast machine or a slow one
PAUSED = "kvae test: paused in epoch 3"
PAUSE_IN_EPOCH_3 = f"""
import sys, threading, keras
from kvae.fit import fit, parse_args, resolve_config

class Pause(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 2:
            print({PAUSED!r}, flush=True)
            threading.Event().wait()

fit(resolve_config(parse_args(sys.argv[1:])), callbacks=[Pause()])
"""


@pytest.mark.slow
def test_same_seed_same_weights_and_resume_after_sigkill(uninterrupted_run, digits_npz, cli_run, tmp_path):
    args = uninterrupted_run.args  # 6 epochs; the straight run is cli_run
    straight, code, output = cli_run
    assert code == 0, output[-3000:]

    killed = tmp_path / "killed"
    with (open(tmp_path / "killed.stderr", "w") as stderr,
          subprocess.Popen([sys.executable, "-c", PAUSE_IN_EPOCH_3, "--out", str(killed), *args],
                           stdout=subprocess.PIPE, stderr=stderr, text=True) as proc):
        watchdog = threading.Timer(600, proc.kill)  # a safety net: a hung child fails, not a slow one
        watchdog.start()
        paused = any(line.startswith(PAUSED) for line in proc.stdout)  # False if it ended first
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        watchdog.cancel()
    assert paused, (tmp_path / "killed.stderr").read_text()[-3000:]
    progress = killed / "state" / "progress.json"
    assert json.loads(progress.read_text())["epochs_done"] == 2  # epoch 3 was cut half-way
    result = run_cli("--out", str(killed), "--resume", "--dataset", digits_npz)
    assert result.returncode == 0, result.stderr
    assert f"resuming {killed} after epoch 2" in result.stdout

    epochs = [r.split(",")[0] for r in (killed / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3", "4", "5", "6"]  # every epoch exactly once
    a = weights(straight / "state" / "epoch-0006.weights.h5")
    b = weights(killed / "state" / "epoch-0006.weights.h5")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert (killed / "vae.keras").exists()


# small, fast runs for the resume tests below (an MLP; no warm-up, so nothing but the rate changes)
SMALL = dict(arch="mlp", latent_dim=4, hidden=32, batch_size=64, val_size=64, eval_k=0, kl_warmup=0)


def history_column(run: Path, name: str) -> list[float]:
    rows = (run / "history.csv").read_text().splitlines()
    index = rows[0].split(",").index(name)
    return [float(r.split(",")[index]) for r in rows[1:]]


def model_weights(path: Path) -> np.ndarray:
    """The layers' kernels and biases in a `.weights.h5` file, as one flat vector (not the
    optimizer's variables, nor the posterior's scalars: beta and the eps counter)."""
    return np.concatenate([np.ravel(v) for k, v in sorted(weights(path).items())
                           if not k.startswith("optimizer") and np.ndim(v) > 0])


def test_resume_with_a_new_lr_trains_with_it(tiny_npz, tmp_path):
    from kvae.config import Config
    from kvae.fit import fit

    same, lower = tmp_path / "same", tmp_path / "lower"
    fit(Config(dataset=tiny_npz, out=str(same), epochs=2, lr=1e-3, lr_schedule="constant", **SMALL))
    shutil.copytree(same, lower)
    start = model_weights(same / "state" / "epoch-0002.weights.h5")
    for run, lr in ((same, 1e-3), (lower, 1e-4)):
        fit(Config(dataset=tiny_npz, out=str(run), epochs=3, lr=lr, lr_schedule="constant", **SMALL),
            resume=True)
    # the rate the optimizer used in each epoch
    np.testing.assert_allclose(history_column(same, "lr"), [1e-3, 1e-3, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(history_column(lower, "lr"), [1e-3, 1e-3, 1e-4], rtol=1e-6)
    # and what it did: Adam's steps scale with the rate, so epoch 3 moves the weights about 10x
    # less (an ignored --lr: exactly as far) and lowers the loss less
    moved = [np.linalg.norm(model_weights(run / "state" / "epoch-0003.weights.h5") - start)
             for run in (same, lower)]
    assert 0.05 < moved[1] / moved[0] < 0.2, moved
    loss_same, loss_lower = history_column(same, "loss"), history_column(lower, "loss")
    assert loss_same[:2] == loss_lower[:2] and loss_lower[2] > loss_same[2], (loss_same, loss_lower)


def test_resume_with_more_epochs_stretches_the_cosine_schedule(tiny_npz, tmp_path):
    import keras

    from kvae.config import Config
    from kvae.fit import fit

    class Rates(keras.callbacks.Callback):
        """(optimizer step, learning rate) at the start of every train step."""

        def __init__(self):
            super().__init__()
            self.seen = []

        def on_train_batch_begin(self, batch, logs=None):
            optimizer = self.model.optimizer
            self.seen.append((int(keras.ops.convert_to_numpy(optimizer.iterations)),
                              float(keras.ops.convert_to_numpy(optimizer.learning_rate))))

    def cosine(step, total, lr=2e-3, alpha=0.1):  # Config.lr_schedule "cosine": down to 10%
        return lr * (alpha + (1 - alpha) * 0.5 * (1 + np.cos(np.pi * step / total)))

    run = tmp_path / "run"
    values = dict(dataset=tiny_npz, out=str(run), lr=2e-3, lr_schedule="cosine",
                  steps_per_execution=1, **SMALL)  # one step per call: a callback sees every step
    first, resumed = Rates(), Rates()
    fit(Config(epochs=2, **values), callbacks=[first])
    fit(Config(epochs=4, **values), resume=True, callbacks=[resumed])
    steps = len(first.seen) // 2  # per epoch
    assert steps > 1 and [s for s, _ in first.seen] == list(range(2 * steps))
    assert [s for s, _ in resumed.seen] == list(range(2 * steps, 4 * steps))  # steps carry on
    np.testing.assert_allclose([r for _, r in first.seen],
                               [cosine(s, 2 * steps) for s in range(2 * steps)], rtol=1e-5)
    # after the resume: the cosine over the new total of 4 epochs, from where the run stood
    np.testing.assert_allclose([r for _, r in resumed.seen],
                               [cosine(s, 4 * steps) for s in range(2 * steps, 4 * steps)], rtol=1e-5)
    np.testing.assert_allclose(history_column(run, "lr"), [cosine(0, 2 * steps), cosine(steps, 2 * steps),
                               cosine(2 * steps, 4 * steps), cosine(3 * steps, 4 * steps)], rtol=1e-5)


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    from kvae.callbacks import RunState
    from kvae.config import Config

    class Model:
        stop_training = False

    state = RunState(tmp_path, Config())
    state.set_model(Model())
    state.on_epoch_end(0, {"loss": float("nan"), "val_loss": 1.0})
    assert state.nan_epoch == 0 and state.model.stop_training
    assert not list((tmp_path / "state").glob("*.weights.h5"))  # a NaN epoch is never saved


def _bad_inputs(tmp_path, tiny_npz):
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "nox.npz", images=np.zeros((10, 4, 4)))
    np.savez(tmp_path / "nan.npz", x=np.full((10, 4, 4), np.nan))
    (tmp_path / "a_file").write_text("")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text(json.dumps({"latent_dim": 4}))
    return {
        "unknown dataset": (["--dataset", "no_such_dataset"], "unknown dataset"),
        "missing path": (["--dataset", str(tmp_path / "missing.npz")], "no such file"),
        "folder without images": (["--dataset", str(tmp_path / "empty")], "no images"),
        "npz without x": (["--dataset", str(tmp_path / "nox.npz")], "no array named 'x'"),
        "NaN pixels": (["--dataset", str(tmp_path / "nan.npz")], "NaN"),
        "negative latent dim": (["--latent-dim", "-3"], "--latent-dim must be a positive"),
        "unwritable out": (["--dataset", tiny_npz, "--out", str(tmp_path / "a_file" / "run")],
                           "cannot write to --out"),
        "existing run": (["--dataset", tiny_npz, "--out", str(existing)], "already holds a run"),
        "resume nothing": (["--resume", "--out", str(tmp_path / "nothing")], "holds no run"),
        "resume with a change": (["--resume", "--out", str(existing), "--latent-dim", "5"],
                                 "cannot change --latent-dim"),
        "bad config file": (["--config", str(tmp_path / "a_file")], "cannot read config file"),
    }


CASES = ["unknown dataset", "missing path", "folder without images", "npz without x",
         "NaN pixels", "negative latent dim", "unwritable out", "existing run", "resume nothing",
         "resume with a change", "bad config file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_nonzero_exit_nothing_written(case, tmp_path, tiny_npz, capsys):
    args, message = _bad_inputs(tmp_path, tiny_npz)[case]
    out = tmp_path / "out"
    if "--out" not in args:
        args = [*args, "--out", str(out)]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvae.fit: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no half-written run folder


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    result = run_cli("--latent-dim", "-1", "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "kvae.fit: error: --latent-dim must be a positive integer (got -1)"]


def test_resume_after_a_nan_in_the_first_epoch_starts_over(tmp_path):
    from kvae.callbacks import RunState
    from kvae.config import Config

    state = RunState(tmp_path, Config())
    state.save_progress()  # what fit() leaves when epoch 1 went NaN: no weights, epochs_done 0
    assert RunState(tmp_path, Config()).restore(vae=None) == 0


def test_resume_of_a_run_from_before_the_lr_column(tmp_path):
    from kvae.callbacks import RunState
    from kvae.config import Config

    class Model:  # what RunState touches of a VAE
        stop_training = False

        class optimizer:
            learning_rate = 0.5

        def load_weights(self, path):
            pass

        def save_weights(self, path):
            open(path, "wb").close()

    (tmp_path / "state").mkdir()
    (tmp_path / "history.csv").write_text("epoch,loss\n1,5.0\n")  # written before `lr` existed
    RunState(tmp_path, Config()).save_progress()
    progress = tmp_path / "state" / "progress.json"
    progress.write_text(json.dumps({**json.loads(progress.read_text()), "epochs_done": 1}))
    for epoch in (1, 2):  # a second resume reads the half-empty column back
        state = RunState(tmp_path, Config())
        assert state.restore(Model()) == epoch
        state.set_model(Model())
        state.on_epoch_begin(epoch)
        state.on_epoch_end(epoch, {"loss": 4.0})
    assert (tmp_path / "history.csv").read_text().splitlines() == [
        "epoch,loss,lr", "1,5.0,", "2,4.0,0.5", "3,4.0,0.5"]


def test_best_epoch_is_judged_with_the_full_beta(tmp_path):
    from kvae.callbacks import RunState
    from kvae.config import Config

    class Model:
        stop_training = False

        def save_weights(self, path):
            open(path, "wb").close()

    state = RunState(tmp_path, Config(beta=1.0))
    state.set_model(Model())
    # warm-up epoch (beta 0.2): val_loss 120 looks best, but rec + 1.0 * KL = 140 is worse
    state.on_epoch_end(0, {"loss": 1, "val_loss": 120, "val_reconstruction_loss": 115, "val_kl_loss": 25})
    state.on_epoch_end(1, {"loss": 1, "val_loss": 130, "val_reconstruction_loss": 110, "val_kl_loss": 20})
    assert state.best_epoch == 1 and state.best_val_loss == 130


def test_resume_rules(tmp_path):
    from kvae.config import ConfigError
    from kvae.fit import parse_args, resolve_config

    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"epochs": 10, "out": str(run)}))
    (run / "state" / "progress.json").write_text(json.dumps({"epochs_done": 6}))
    config = resolve_config(parse_args(["--resume", "--out", str(run), "--lr", "0.0005", "--epochs", "12"]))
    assert (config.lr, config.epochs) == (0.0005, 12)  # a NaN run resumes with a lower lr
    with pytest.raises(ConfigError, match="already finished 6 epochs"):
        resolve_config(parse_args(["--resume", "--out", str(run), "--epochs", "4"]))
    with pytest.raises(ConfigError, match="drop --config"):
        resolve_config(parse_args(["--resume", "--out", str(run), "--config", str(run / "config.json")]))


def test_kl_warmup_ramps_and_ends_at_full_beta_in_short_runs(tiny_npz, tmp_path):
    import keras

    from kvae.config import Config
    from kvae.fit import fit

    class Betas(keras.callbacks.Callback):
        values: list = []

        def on_epoch_end(self, epoch, logs=None):
            self.values.append(float(keras.ops.convert_to_numpy(self.model.posterior.beta)))

    seen = Betas()
    for epochs, warmup, want in ((3, 80, [1 / 3, 2 / 3, 1]), (3, 2, [0.5, 1, 1]), (2, 0, [1, 1])):
        seen.values = []
        fit(Config(dataset=tiny_npz, latent_dim=4, hidden=32, val_size=64, eval_k=0, epochs=epochs,
                   kl_warmup=warmup, beta=1.0, out=str(tmp_path / f"w{warmup}")), callbacks=[seen])
        np.testing.assert_allclose(seen.values, want, rtol=1e-6)  # the default 80 ends by epoch 3


def test_steps_per_execution_is_a_divisor_of_the_epoch():
    from kvae.data import steps_per_execution

    assert [steps_per_execution(s, 8) for s in (70, 35, 64, 13, 3, 1)] == [7, 7, 8, 1, 3, 1]
    assert steps_per_execution(70, 1) == 1


def test_steps_per_execution_trains_the_same_run(tiny_npz, tmp_path):
    # 936 training images / 64 = 14 steps per epoch: 8 per execution would take 16 batches an epoch
    args = ["--dataset", tiny_npz, *TINY, "--epochs", "3", "--eval-k", "0"]
    main(["--out", str(tmp_path / "one"), *args, "--steps-per-execution", "1"])
    main(["--out", str(tmp_path / "eight"), *args, "--steps-per-execution", "8"])
    one, eight = ((tmp_path / name / "history.csv").read_text() for name in ("one", "eight"))
    assert one == eight and len(one.splitlines()) == 4
