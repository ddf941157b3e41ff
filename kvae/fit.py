"""python -m kvae.fit [--dataset mnist-5k] [--out runs/quickstart] [--epochs N] ...

Trains a VAE and writes the run folder:
  config.json  vae.keras  encoder.keras  decoder.keras  history.csv  metrics.json
  samples.png  reconstructions.png  logs/ (TensorBoard)  state/ (resume)

The models saved are the best by validation loss. `--resume` continues an interrupted run (even
one killed with SIGKILL) from its last finished epoch; every epoch appears in history.csv once.
SIGINT (Ctrl-C) and SIGTERM stop a run within a step, keeping the folder as its last finished
epoch left it, with one line (`interrupted after epoch N of M; continue with ...`) and exit code
130 / 143. One process at a time writes a run folder (kvae.runlock): a second one exits with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kvae.config import Config, ConfigError, add_config_flags, config_from_args
from kvae.cli import ArgumentParser, cli_errors, require_train_stack
from kvae.errors import Interrupted, KVAEError, signals_deferred, signals_interrupt
from kvae.files import atomic_path, remove_stale_temps
from kvae.runlock import run_lock

def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m kvae.fit",
        description="Train a variational autoencoder (Keras 3, TFP posterior) and write a run folder.",
        epilog="Precedence: defaults < --config FILE < flags. Example: python -m kvae.fit "
               "--dataset mnist-5k --out runs/quickstart",
    )
    parser.add_argument("--config", metavar="FILE", help="JSON file with config values")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last finished epoch "
                             "(only --epochs, --lr and --cache may change)")
    add_config_flags(parser)
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    """Builds the run's config from defaults, --config, a resumed run's config.json and flags."""
    if args.resume and args.config:
        raise ConfigError("--resume continues the run with its own config.json; drop --config")
    base = Config.from_json(args.config) if args.config else None
    if args.resume:
        out = Path(args.out or Config().out)
        saved = out / "config.json"
        if not saved.exists():
            raise KVAEError(f"--resume: {out} holds no run (no config.json); start it without --resume")
        base = Config.from_run(saved)
        changed = [name for name, value in vars(args).items()
                   if name in base.to_dict() and value is not None and name not in RESUMABLE
                   and value != getattr(base, name)]
        if changed:
            raise ConfigError(f"--resume continues the run as configured; cannot change "
                              f"{', '.join('--' + c.replace('_', '-') for c in changed)} "
                              "(only --epochs, --lr and --cache)")
        done = _epochs_done(out)
        if args.epochs is not None and args.epochs < done:
            raise ConfigError(f"--resume: {out} has already finished {done} epochs; "
                              f"--epochs {args.epochs} cannot undo them")
    return config_from_args(args, base)


# what --resume may change: a NaN run resumes with a lower lr; the cache never changes the batches
RESUMABLE = ("epochs", "lr", "out", "cache")


def _epochs_done(out: Path) -> int:
    try:
        return int(json.loads((out / "state" / "progress.json").read_text())["epochs_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def check_out(out: Path) -> None:
    """Fails early (before any training, before the lock makes the folder) if --out is unusable."""
    if out.exists() and not out.is_dir():
        raise KVAEError(f"--out {out} is a file, not a folder")
    probe = out if out.exists() else next(p for p in [*out.parents] if p.exists())
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise KVAEError(f"cannot write to --out {out}: {e.strerror or e}") from None


def check_new(out: Path, resume: bool) -> None:
    """Under the run lock: a new run needs a folder without one."""
    if not resume and (out / "config.json").exists():
        raise KVAEError(f"{out} already holds a run: pass --resume to continue it, or choose "
                        "another --out")


def main(argv=None) -> None:
    with cli_errors("kvae.fit"), signals_interrupt():
        args = parse_args(argv)
        require_train_stack("kvae.fit")  # this module's imports above are TensorFlow-free
        config = resolve_config(args)
        out, chief = Path(config.out), is_chief()
        if chief:
            check_out(out)
        # the lock first: a second writer hears of the first (its pid), not of its files
        with run_lock(out, "kvae.fit", create=True) if chief else contextlib.nullcontext():
            if chief:
                check_new(out, args.resume)
            try:
                fit(config, resume=args.resume)
            except Interrupted as e:
                raise e.with_message(interrupted(out, config.resolved_epochs)) from None


def interrupted(out: Path, epochs: int) -> str:
    """The line an interrupted fit ends with: what the folder holds and how to continue."""
    again = f"python -m kvae.fit --resume --out {shlex.quote(str(out))}"
    if not (out / "config.json").exists():
        return f"interrupted before training began; nothing was kept in {out}"
    done = _epochs_done(out)
    if done == 0:
        return f"interrupted before epoch 1 of {epochs} ended; continue with {again}"
    return f"interrupted after epoch {done} of {epochs}; continue with {again}"


def fit(config: Config, resume: bool = False, callbacks=()) -> dict:
    """Trains the VAE that `config` describes and writes its run folder. Returns metrics.

    Holds the run folder's lock (kvae.runlock) while it runs. SIGINT / SIGTERM wait for an
    epoch's commit that has begun (see RunState).

    Args:
      config: the run.
      resume: continue the run in `config.out` from its last finished epoch.
      callbacks: extra Keras callbacks (benchmarks use them to watch training).

    Raises:
      kvae.runlock.RunInUse: another process writes `config.out`.
    """
    config = config.resolved()  # config.json says which beta and warm-up the run used
    with run_lock(config.out, "kvae.fit", create=True) if is_chief() else contextlib.nullcontext():
        return _fit(config, resume, callbacks)


def _fit(config: Config, resume: bool, callbacks) -> dict:
    from kvae import data as kdata

    binarize = config.resolved_binarize
    dataset = kdata.load(config.dataset, config.data_dir, config.val_size,  # fails before any write
                         image_size=config.image_size)
    y_train = y_val = None
    if config.conditional:  # a dataset without labels (for every image) ends here, one line
        y_train, y_val = dataset.labels("train"), dataset.labels("val")
    num_classes = dataset.num_classes if config.conditional else 0

    import keras

    from kvae.callbacks import KLWarmup, RunState
    from kvae.model import build_vae

    backend = keras.backend.backend()
    strategy = make_strategy(config.strategy)
    replicas = strategy.num_replicas_in_sync if strategy else 1
    chief = is_chief()
    out = Path(config.out) if chief else Path(tempfile.mkdtemp(prefix="kvae-worker-"))

    print(f"kvae.fit: {config.dataset}: {len(dataset.x_train)} train / {len(dataset.x_val)} "
          f"validation images of shape {dataset.image_shape}; binarize={binarize}"
          + (f"; conditional on {num_classes} classes" if num_classes else ""))
    print("kvae.fit: config " + json.dumps(config.to_dict()))
    gpus = accelerators()
    print(f"kvae.fit: Keras backend {backend}; device {'GPU: ' + ', '.join(gpus) if gpus else 'CPU'}; "
          f"strategy {config.strategy} with {replicas} replica(s); global batch {config.batch_size}")

    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy("mixed_float16" if config.mixed_precision else "float32")

    steps = kdata.steps_per_epoch(len(dataset.x_train), config.batch_size)
    total_steps = steps * config.epochs
    with strategy.scope() if strategy else contextlib.nullcontext():
        vae = build_vae(config, dataset.image_shape, num_classes)
        lr = config.lr
        if config.lr_schedule == "cosine":
            lr = keras.optimizers.schedules.CosineDecay(config.lr, total_steps, alpha=0.1)
        vae.compile(optimizer=keras.optimizers.Adam(lr),
                    **compile_options(config, steps, gpus, backend, replicas))
        vae.optimizer.build(vae.trainable_variables)

    # written once the model exists: a model too big for memory leaves no half-started run behind
    out.mkdir(parents=True, exist_ok=True)
    config.to_json(out / "config.json")
    if resume:
        remove_stale_temps(out, out / "state")  # what a killed run was writing
    state = RunState(out, config)
    initial_epoch = state.restore(vae, Path(config.out)) if resume else 0  # workers read the chief's
    if initial_epoch >= config.epochs:
        print(f"kvae.fit: {out} already finished {initial_epoch} epochs")
    else:
        if initial_epoch:
            print(f"kvae.fit: resuming {out} after epoch {initial_epoch}")
        if backend == "tensorflow":
            train, steps = kdata.train_dataset(dataset.x_train, config.batch_size, binarize,
                                               config.seed, initial_epoch, config.epochs, config.cache,
                                               y_train, num_classes)
            val = kdata.eval_dataset(dataset.x_val, 256, binarize, y_val, num_classes)
        else:  # no tf.data: numpy batches
            train, steps = kdata.train_batches(dataset.x_train, config.batch_size, binarize,
                                               config.seed, initial_epoch, config.epochs, y_train,
                                               num_classes)
            x_val = kdata.binarize_fixed(dataset.x_val, binarize)
            val = (x_val,) if y_val is None else ((x_val, kdata.one_hot(y_val, num_classes)),)
        logs = [] if importlib.util.find_spec("tensorflow") is None else [  # it writes with tf.summary
            keras.callbacks.TensorBoard(str(out / "logs"), write_graph=False, profile_batch=0)]
        started = time.perf_counter()
        vae.fit(train, epochs=config.epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
                validation_data=val, validation_batch_size=256, shuffle=False,
                verbose=1 if sys.stdout.isatty() else 2,
                callbacks=[KLWarmup.of(vae.posterior, config), state, *callbacks, *logs])
        state.train_seconds += time.perf_counter() - started
        state.save_progress()
        if not chief:
            shutil.rmtree(out, ignore_errors=True)  # only the chief writes the run folder
            return {}
        if state.nan_epoch is not None:
            raise KVAEError(f"the loss became NaN or infinite in epoch {state.nan_epoch + 1}; "
                            f"lower --lr (now {config.lr}) or use --likelihood bernoulli; "
                            f"--resume continues from the last good epoch")
    return finish(vae, dataset, config, state)


def make_strategy(name: str):
    """The tf.distribute strategy for `--strategy`: the default (one device) for `none`, and None
    under other Keras backends."""
    import keras

    if keras.backend.backend() != "tensorflow":
        if name != "none":
            raise KVAEError(f"--strategy {name} uses tf.distribute: run it with the TensorFlow "
                            f"backend (KERAS_BACKEND=tensorflow), not {keras.backend.backend()}")
        return None
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        if "TF_CONFIG" not in os.environ:
            raise KVAEError("--strategy multi-worker needs the TF_CONFIG environment variable "
                            "(cluster and task) on every machine")
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except tf.errors.UnknownError as e:
            if "gRPC server" not in str(e):
                raise
            task = json.loads(os.environ["TF_CONFIG"]).get("task")
            raise KVAEError(f"--strategy multi-worker: could not start the gRPC server of task "
                            f"{json.dumps(task)}: is its port in TF_CONFIG already in use?") from None
    return tf.distribute.get_strategy()


def compile_options(config: Config, steps: int, gpus: list, backend: str, replicas: int = 1) -> dict:
    """`compile()`'s XLA and steps-per-execution arguments for a run (bench/train_throughput.py
    times exactly these).

    XLA is on by default with a GPU and always under JAX (its only fast mode), off on a CPU
    (`bench/train_throughput.py --jit on` measures it) and inside tf.distribute (as Keras's own
    "auto" does). Keras's multi-step loop fails under tf.distribute with this model ("You must
    feed a value for placeholder tensor" inside its while loop): one step per call there.
    """
    from kvae import data as kdata

    jit = (bool(gpus) or backend == "jax") if config.jit is None else config.jit
    spe = 1 if config.strategy != "none" else kdata.steps_per_execution(steps, config.steps_per_execution)
    return {"jit_compile": bool(jit) and replicas == 1, "steps_per_execution": spe}


def accelerators() -> list[str]:
    """Names of the GPUs the Keras backend will train on ([] on CPU)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    import tensorflow as tf

    return [g.name for g in tf.config.list_physical_devices("GPU")]


def is_chief() -> bool:
    """True unless TF_CONFIG names this process a non-chief worker (only the chief writes)."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task", {})
    kind, index = task.get("type"), task.get("index", 0)
    if kind in (None, "chief"):
        return True
    return kind == "worker" and index == 0 and "chief" not in tf_config.get("cluster", {})


def finish(vae, dataset, config: Config, state) -> dict:
    """Writes the best models, pictures and metrics into the run folder."""
    import keras
    import numpy as np

    from kvae import data as kdata
    from kvae import plots
    from kvae import prior as kprior

    out = Path(config.out)
    vae.load_weights(state.weights_path(state.best_epoch))
    with signals_deferred():  # the three models of one epoch, never a mix of two
        for name, model in (("vae", vae), ("encoder", vae.encoder), ("decoder", vae.decoder())):
            with atomic_path(out / f"{name}.keras") as tmp:
                keras.saving.save_model(model, tmp)

    fitted = fit_prior(vae, dataset, config)
    if fitted is None:
        (out / kprior.FILE).unlink(missing_ok=True)
    else:  # names the encoder it was fitted with: a prior left by an earlier training is refused
        from kvae.contract import sha256

        fitted["source"] = {"encoder.keras": sha256(out / "encoder.keras")}
        kprior.write(out / kprior.FILE, fitted)
    x = kdata.to_unit(dataset.x_val[:32])
    rng = np.random.default_rng(config.seed)

    def draw(n):  # z from the sampling prior: the fitted one, else N(0, I)
        return kprior.draw(fitted, n, vae.latent_dim, rng)

    if vae.num_classes:  # one row per class (up to 10 shown), 8 samples each
        shown = min(vae.num_classes, 10)
        z = draw(shown * 8)
        y = kdata.one_hot(np.repeat(np.arange(shown), 8), vae.num_classes)
        y_val = kdata.one_hot(dataset.labels("val")[:32], vae.num_classes)
        loc, _ = vae.encode(x, y_val)
        samples, recon = vae.decode(z, y), vae.decode(loc, y_val)
    else:
        z = draw(64)
        loc, _ = vae.encode(x)
        samples, recon = vae.decode(z), vae.decode(loc)
    plots.save_grid(np.asarray(samples), out / "samples.png", cols=8)
    plots.save_grid(plots.interleave(x, np.asarray(recon)), out / "reconstructions.png", cols=8)
    n_train = len(dataset.x_train)
    steps = kdata.steps_per_epoch(n_train, config.batch_size)
    metrics = {
        "dataset": config.dataset,
        **({"classes": list(dataset.class_names)} if vae.num_classes else {}),
        "n_train": n_train,
        "n_val": len(dataset.x_val),
        "epochs": state.epochs_done,
        "best_epoch": state.best_epoch + 1,
        "best_val_loss": state.best_val_loss,
        "final": state.last_logs,
        "train_seconds": round(state.train_seconds, 2),
        "train_samples_per_second": round(  # all sessions of a resumed run
            state.epochs_done * steps * min(config.batch_size, n_train)
            / max(state.train_seconds, 1e-9), 1),
    }
    from kvae.evaluate import evaluate, save_figures
    from kvae.runs import merge_metrics

    save_figures(vae, dataset.x_val, dataset.y_val, out)
    if config.eval_k:
        metrics["eval"] = evaluate(vae, dataset.x_val, config.resolved_binarize, k=config.eval_k,
                                   split="val", dataset=config.dataset,
                                   labels=dataset.y_val if vae.num_classes else None)
    merge_metrics(out, metrics, holder="kvae.fit")
    print(f"kvae.fit: best val loss {state.best_val_loss:.2f} nats (epoch {state.best_epoch + 1}); "
          f"wrote {out}")
    return metrics


PRIOR_IMAGES = 10_000  # training images whose codes the sampling prior is fitted to (at most)


def training_codes(vae, dataset, config: Config):
    """The posterior means loc of Q(z|X) of the first PRIOR_IMAGES training images, binarized
    as held-out images are (in chunks of 500, each with its own seed): (n, latent_dim)."""
    import numpy as np

    from kvae import data as kdata

    n = min(len(dataset.x_train), PRIOR_IMAGES)
    codes = []
    for i, start in enumerate(range(0, n, 500)):
        x = kdata.binarize_fixed(dataset.x_train[start:min(n, start + 500)], config.resolved_binarize,
                                 seed=kdata.EVAL_SEED + 100 + i)
        y = (kdata.one_hot(dataset.labels("train")[start:start + len(x)], vae.num_classes)
             if vae.num_classes else None)
        codes.append(np.asarray(vae.encode(x, y)[0]))
    return np.concatenate(codes)


def fit_prior(vae, dataset, config: Config) -> dict | None:
    """The sampling prior (kvae.prior): the model's own learned P(z) (--prior-mixture), else one
    fitted to `training_codes` (--prior-components); None for neither (samples from N(0, I))."""
    from kvae import prior as kprior

    learned = vae.model_prior()
    if learned is not None:
        return kprior.learned(learned, f"learned with the model on {config.dataset}")
    if not config.resolved_prior_components:
        return None
    codes = training_codes(vae, dataset, config)
    fitted = kprior.fit(codes, config.resolved_prior_components, seed=config.seed)
    fitted["fitted_on"] = f"posterior means of {len(codes)} training images of {config.dataset}"
    return fitted


if __name__ == "__main__":
    main()
