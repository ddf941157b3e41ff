"""python bench/quality_sweep.py NAME [--shift S] [--ema M] [--wd W] [--k 200] [kvae.fit flags...]

One variant of the quickstart training for the quality sweep behind the defaults (issue 7): the
kvae.fit flags, plus three regularizers kvae does not ship because they did not help here:
random shifts of the training digits by up to S pixels, an exponential moving average of the
weights (Adam's `use_ema`, momentum M), decoupled weight decay W (AdamW). Trains with the same
data pipeline, model and KL warm-up as kvae.fit, then estimates -log P(X) of the final weights
with k importance samples on the 500 mnist-5k validation digits (`nll`; the sweep chooses the
defaults by it, so it is a validation number) and on 500 training digits (`train_nll`), and
judges 1,000 samples with bench/digits.py's classifier (`samples`, as in bench/quality.py: from
N(0, I) and from the sampling prior fitted to the training codes, `--prior-components`).

Prints one JSON line and appends it to bench/results/quality_sweep.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import keras
import tensorflow as tf

from kvae import data as kdata
from kvae.callbacks import KLWarmup
from kvae.config import add_config_flags, config_from_args
from kvae.evaluate import iwae_nll, summarize
from kvae.fit import fit_prior
from kvae.model import build_vae

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/digits.py, bench/quality.py
RESULTS = Path(__file__).parent / "results"
SAMPLE_KEYS = ("confident_share", "class_entropy_bits", "frechet", "frechet_floor")


def shifted(batch, pixels: int):
    """Each image moved by a random whole number of pixels in [-pixels, pixels], zeros shifted in."""
    b = tf.shape(batch)[0]
    t = tf.cast(tf.random.uniform([b, 2], -pixels, pixels + 1, tf.int32), tf.float32)
    one, zero = tf.ones([b, 1]), tf.zeros([b, 1])
    transforms = tf.concat([one, zero, t[:, :1], zero, one, t[:, 1:], zero, zero], 1)
    return tf.raw_ops.ImageProjectiveTransformV3(images=batch, transforms=transforms,
                                                 output_shape=tf.shape(batch)[1:3],
                                                 interpolation="NEAREST", fill_mode="CONSTANT",
                                                 fill_value=0.0)


def main(variant: str | None = None) -> None:
    """`variant`: the bench/arch_variants.py variant this process builds instead of kvae's model, if any."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a name for this variant")
    parser.add_argument("--shift", type=int, default=0, help="random shifts of up to N pixels")
    parser.add_argument("--ema", type=float, default=0.0, help="weight EMA momentum (0 = off)")
    parser.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay (0 = Adam)")
    parser.add_argument("--k", type=int, default=200, help="importance samples (default 200)")
    parser.add_argument("--samples", type=int, default=1000,
                        help="samples judged by bench/digits.py's classifier (0 = none)")
    add_config_flags(parser)
    args = parser.parse_args()
    args.out = args.out or "runs/quality-sweep"
    config = config_from_args(args)
    if config.conditional:  # its NLL is -log P(X|y); this benchmark scores unconditional models
        sys.exit("bench/quality_sweep.py: error: --conditional is not measured here: use python bench/conditional.py "
                 "RUN for a conditional run")
    data = kdata.load(config.dataset, config.data_dir, config.val_size, image_size=config.image_size)
    keras.utils.set_random_seed(config.seed)
    vae = build_vae(config, data.image_shape)
    steps = kdata.steps_per_epoch(len(data.x_train), config.batch_size)
    lr = keras.optimizers.schedules.CosineDecay(config.lr, steps * config.resolved_epochs, alpha=0.1)
    ema = {"use_ema": args.ema > 0, "ema_momentum": args.ema or 0.99}  # EMA weights at the end
    optimizer = (keras.optimizers.AdamW(lr, weight_decay=args.wd, **ema) if args.wd
                 else keras.optimizers.Adam(lr, **ema))
    vae.compile(optimizer=optimizer)
    train, steps = kdata.train_dataset(data.x_train, config.batch_size, config.resolved_binarize,
                                       config.seed, 0, config.resolved_epochs)
    if args.shift:
        train = train.map(lambda batch: shifted(batch, args.shift))
    start = time.perf_counter()
    vae.fit(train, epochs=config.resolved_epochs, steps_per_epoch=steps, verbose=0,
            callbacks=[KLWarmup.of(vae.posterior, config)])
    seconds = time.perf_counter() - start
    held_out = summarize(iwae_nll(vae, kdata.binarize_fixed(data.x_val, config.resolved_binarize), args.k))
    train_nll = summarize(iwae_nll(vae, kdata.binarize_fixed(data.x_train[:500], config.resolved_binarize),
                                   args.k))
    line = {"name": args.name, "train_seconds": round(seconds, 1), "nll": round(held_out["nll"], 2),
            "nll_se": round(held_out["nll_se"], 2), "train_nll": round(train_nll["nll"], 2),
            "k": args.k, "argv": sys.argv[2:],
            "config": {k: v for k, v in config.resolved().to_dict().items() if k not in ("out", "data_dir")}}
    if variant:
        line["variant"] = variant
    if args.samples:
        import digits
        import quality

        model, real, _ = digits.classifier("mnist-5k")
        measures = quality.sample_measures(vae, fit_prior(vae, data, config), args.samples, (model, real))
        line["samples"] = {prior: {key: round(q[key], 3) for key in SAMPLE_KEYS}
                           for prior, q in measures.items()}
    print(json.dumps(line), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "quality_sweep.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
