"""python -m kvae.evaluate RUN [--dataset NAME] [--split val|test] [--k 5000] [--n N]

Negative ELBO (reconstruction + KL) and the importance-weighted estimate of -log P(X) (Burda,
Grosse & Salakhutdinov 2015, "Importance Weighted Autoencoders", eq. 8) on the run's validation
images (`--split val`, the default: they picked the best epoch, so the numbers are validation
numbers) or on a TFDS dataset's test split (`--split test`: images no choice saw):

    log P(X) ~= log (1/k) sum_i P(X|z_i) P(z_i) / Q(z_i|X),   z_i ~ Q(z|X)

computed with log-sum-exp in chunks (memory stays bounded for k = 5000). Binarized data is
binarized once with a fixed seed (kvae.data.EVAL_SEED) so numbers compare across runs. Results
are merged into RUN/metrics.json under "eval". It holds RUN's writer lock (kvae.runlock) while it
runs: with a fit or an export of RUN running it ends at once (exit code 2, the holder's pid).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np

from kvae import runs
from kvae.cli import ArgumentParser, cli_errors, require_train_stack
from kvae.errors import KVAEError, signals_interrupt
from kvae.runlock import run_lock



def iwae_nll(vae, x: np.ndarray, k: int, seed: int = 0, batch_size: int = 100,
             budget: int = 1 << 23, progress: bool = False,
             y: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-example importance-weighted -log P(X) (-log P(X|y) for a conditional model, with
    Q(z|X, y) as the proposal) and single-sample ELBO parts, in nats.

    Args:
      vae: a kvae.model.VAE.
      x: (N, H, W, C) float32 in [0, 1], already binarized for a Bernoulli likelihood.
      y: (N, num_classes) one-hot conditions of a conditional model (None otherwise).
      k: importance samples per example.
      seed: seeds eps (stateless: the same seed gives the same estimate).
      batch_size: examples per encoder call.
      budget: at most this many decoded pixels are held at once (chunks of samples).

    Returns:
      dict of (N,) arrays: `nll` (IWAE), `reconstruction` (mean over the k samples of
      -log P(X|z)), `kl` (KL[Q(z|X) || P(z)]: analytic for P(z) = N(0, I), the mean of
      log Q(z|X) - log P(z) over the k samples for a learned prior).
    """
    import keras
    from keras import ops

    from kvae.model import reconstruction_nll
    from kvae.iwae import log_prior_over_q, logsumexp

    prior = vae.model_prior()  # P(z): None for N(0, I)
    pixels = int(np.prod(x.shape[1:]))
    batch_size = max(1, min(batch_size, len(x)))
    chunk = max(1, min(k, budget // (batch_size * pixels)))

    def log_px(xb, z, yb=None):  # xb (B, H, W, C), z (s, B, D), yb (B, K) -> (s, B) log P(X|z[, y])
        s, b = z.shape[0], z.shape[1]
        flat = ops.reshape(z, (-1, z.shape[-1]))  # sample-major: row i * B + j is image j
        if yb is not None:
            flat = [flat, ops.reshape(ops.broadcast_to(yb, (s, *yb.shape)), (-1, yb.shape[-1]))]
        logits = vae.decoder_net(flat)
        x_rep = ops.reshape(ops.broadcast_to(xb, (s, *xb.shape)), logits.shape)
        return -ops.reshape(reconstruction_nll(x_rep, logits, vae.likelihood, vae.sigma), (s, b))

    if keras.backend.backend() == "tensorflow":  # one graph per chunk shape instead of eager ops
        import tensorflow as tf

        log_px = tf.function(log_px)  # static shapes: at most 4 traces (last batch, last chunk)

    out = {"nll": [], "reconstruction": [], "kl": []}
    batches = range(0, len(x), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"IWAE k={k}", unit="batch", leave=False,
                       disable=None)  # None: no bar when stderr is not a terminal (logs, CI)
    for b_index, start in enumerate(batches):
        xb = np.asarray(x[start:start + batch_size], np.float32)
        yb = None if y is None else np.asarray(y[start:start + batch_size], np.float32)
        loc, scale = (ops.convert_to_numpy(ops.cast(t, "float32")).astype(np.float64)
                      for t in vae.encoder(xb if yb is None else [xb, yb]))
        lse = np.full(len(xb), -np.inf)
        rec, log_ratio_sum = np.zeros(len(xb)), np.zeros(len(xb))
        for c_index, c_start in enumerate(range(0, k, chunk)):
            s = min(chunk, k - c_start)
            # eps from numpy, keyed by (seed, batch, chunk): the same draws on every backend
            eps = np.random.default_rng([seed, b_index, c_index]).standard_normal((s, *loc.shape))
            z, log_ratio = log_prior_over_q(loc, scale, eps, prior)  # (s, B, D), (s, B)
            lp = ops.convert_to_numpy(log_px(xb, z.astype(np.float32), yb)).astype(np.float64)
            lse = np.logaddexp(lse, logsumexp(lp + log_ratio))
            rec -= lp.sum(0)
            log_ratio_sum += log_ratio.sum(0)
        out["nll"].append(-(lse - math.log(k)))
        out["reconstruction"].append(rec / k)
        out["kl"].append(-log_ratio_sum / k if prior is not None else
                         0.5 * np.sum(loc**2 + scale**2 - 1 - 2 * np.log(scale), -1))
    return {name: np.concatenate(parts).astype(np.float64) for name, parts in out.items()}


def summarize(per_example: dict[str, np.ndarray]) -> dict[str, float]:
    """Means and standard errors (std / sqrt(n)) of the per-example numbers."""
    n = len(per_example["nll"])
    neg_elbo = per_example["reconstruction"] + per_example["kl"]
    result = {}
    for name, values in (("nll", per_example["nll"]), ("neg_elbo", neg_elbo),
                         ("reconstruction", per_example["reconstruction"]),
                         ("kl", per_example["kl"])):
        result[name] = float(values.mean())
        result[name + "_se"] = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return result


def evaluate(vae, x: np.ndarray, binarize: str, k: int = 1000, n: int | None = None,
             seed: int = 0, split: str = "val", dataset: str = "",
             progress: bool = False, labels: np.ndarray | None = None) -> dict:
    """NLL (IWAE, k samples) and negative ELBO on images `x` of `split` (uint8 or [0, 1] floats);
    for a conditional model -log P(X|y) with `labels` (class ids of `x`) as y."""
    from kvae.data import EVAL_SEED, binarize_fixed, one_hot

    x = x[:n] if n else x
    xb = binarize_fixed(x, binarize)
    y = None
    if vae.num_classes:
        if labels is None:
            raise KVAEError("a conditional model is evaluated with the images' class labels")
        y = one_hot(np.asarray(labels)[:len(x)], vae.num_classes)
    result = summarize(iwae_nll(vae, xb, k, seed=seed, progress=progress, y=y))
    return {**result, "k": k, "n": int(len(x)), "seed": seed, "binarize": binarize,
            "binarize_seed": EVAL_SEED if binarize == "dynamic" else None,
            "dataset": dataset, "split": split,
            **({"conditional": True, "nll_of": "-log P(X|y)"} if y is not None else {})}


def save_figures(vae, x_val: np.ndarray, y_val, run: Path) -> list[Path]:
    """Writes latent.png, manifold.png (2-D latent) or traversals.png, training_curves.png."""
    from kvae import plots
    from kvae.data import to_unit

    from kvae.data import one_hot

    def decode(z):  # a conditional model's traversals are of its first class
        y = one_hot(np.zeros(len(z), np.int64), vae.num_classes) if vae.num_classes else None
        return np.asarray(vae.decode(z.astype(np.float32), y))

    x = to_unit(x_val[:2000])
    labels = None if y_val is None else np.asarray(y_val)[:2000]
    y = one_hot(labels, vae.num_classes) if vae.num_classes else None
    loc = np.concatenate([np.asarray(vae.encode(x[i:i + 500], None if y is None else y[i:i + 500])[0])
                          for i in range(0, len(x), 500)])
    written = [plots.latent_scatter(loc, labels, run / "latent.png")]
    if vae.latent_dim == 2:
        written.append(plots.manifold(decode, run / "manifold.png"))
    else:
        written.append(plots.traversals(decode, vae.latent_dim, run / "traversals.png"))
    if (run / "history.csv").exists():
        written.append(plots.training_curves(run / "history.csv", run / "training_curves.png"))
    return written


def format_table(result: dict) -> str:
    rows = [(f"{result.get('nll_of', '-log P(X)')} (IWAE)", "nll"), ("negative ELBO", "neg_elbo"),
            ("  reconstruction", "reconstruction"), ("  KL", "kl")]
    lines = [f"{result['dataset']} {result['split']}: n={result['n']}, k={result['k']} (nats)"]
    lines += [f"  {label:<18} {result[key]:9.2f} +- {result[key + '_se']:.2f}" for label, key in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python -m kvae.evaluate",
        description="Negative ELBO and importance-sampled -log P(X) of a trained run, on its "
                    "validation images or a TFDS test split.")
    parser.add_argument("run", help="run folder written by python -m kvae.fit")
    parser.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    parser.add_argument("--split", choices=("val", "test"), default=None,
                        help="val (default): the run's validation images, which picked its best "
                             "epoch; test: a TFDS dataset's test split, which no choice saw")
    parser.add_argument("--k", type=int, default=1000, help="importance samples per image (default 1000)")
    parser.add_argument("--n", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the importance samples")
    args = parser.parse_args(argv)
    require_train_stack("kvae.evaluate")  # this module's imports above are TensorFlow-free
    with cli_errors("kvae.evaluate"), signals_interrupt(), contextlib.ExitStack() as held:
        if args.k < 1:
            raise KVAEError("--k must be a positive integer")
        if args.n is not None and args.n < 1:
            raise KVAEError("--n must be a positive integer")
        run = runs.check_run(args.run)
        held.enter_context(run_lock(run, "kvae.evaluate"))  # before it reads or writes anything
        runs.check_run(run, needs=("vae.keras",))
        config = runs.read_config(run)
        runs.read_metrics(run)  # an unreadable metrics.json fails now, not after the evaluation
        from kvae import data as kdata

        name = args.dataset or config.dataset
        split = args.split or "val"
        if split == "test" and (name == "mnist-5k" or Path(name).exists()):
            raise KVAEError(f"--split test needs a TFDS dataset with a test split; {name} has only "
                            "the run's validation images: use --split val (the default)")
        data = kdata.load(name, config.data_dir, config.val_size,
                          split="test" if split == "test" else "train", image_size=config.image_size)
        from kvae.model import VAE, load_vae

        vae = runs.load_keras(run / "vae.keras", load_vae)
        if not isinstance(vae, VAE):
            raise KVAEError(f"{run / 'vae.keras'} holds a {type(vae).__name__} ({vae.name!r}), not a kvae "
                            f"VAE: write it again with python -m kvae.fit --resume --out {run}")
        if data.image_shape != vae.image_shape:
            raise KVAEError(f"{name} images are {data.image_shape}, the model takes {vae.image_shape}: "
                            f"pass a --dataset of {vae.image_shape} images")
        labels = data.labels("val") if vae.num_classes else None
        trained = runs.read_metrics(run).get("classes")
        if labels is not None and (data.num_classes != vae.num_classes or (
                trained is not None and list(data.class_names) != list(trained))):
            raise KVAEError(f"{name}'s classes ({', '.join(data.class_names)}) are not the ones the "
                            f"conditional model was trained on ({', '.join(trained or [])}): pass "
                            "the --dataset it was trained on")
        result = evaluate(vae, data.x_val, config.resolved_binarize, k=args.k, n=args.n,
                          seed=args.seed, split=split, dataset=name, progress=True, labels=labels)
        print(format_table(result))
        runs.merge_metrics(run, {"eval": result})
        for path in save_figures(vae, data.x_val, data.y_val, run):
            print(f"kvae.evaluate: wrote {path}")


if __name__ == "__main__":
    main()
