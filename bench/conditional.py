"""python bench/conditional.py RUN [--n 100] [--seed 0] [--classifier-data mnist-5k|mnist]

Does a conditional run draw the digit it is asked for (issue 15)? For every class c of RUN (a
run trained with `python -m kvae.fit --conditional`), draws n latents z ~ N(0, I) (numpy, seeded),
decodes them with y = one-hot(c) through RUN/decoder.keras, and lets bench/digits.py's
independent classifier label the samples. Reports, per class and overall, the share labelled c
(goal: >= 95% overall), and the classifier's sample-quality measures: the share labelled with
probability >= 0.9, the mean largest probability, the entropy of the predicted-class histogram,
and (overall) the Frechet distance of the classifier's features to the 500 held-out mnist-5k
digits, next to its floor (as many real training digits as samples). See bench/digits.py for
which digits train the classifier: by default mnist-5k's training split, the digits the VAE
trained on too.

Prints a table, writes bench/results/conditional.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/digits.py and machine.py
import digits  # noqa: E402
import machine  # noqa: E402

from kvae.errors import KVAEError  # noqa: E402
from kvae.files import atomic_write_json, read_json_object  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GOAL = 0.95  # share of samples the classifier labels as the class they were drawn for
DIGITS = [str(d) for d in range(10)]


def open_run(run: str | Path):
    """RUN's conditional decoder and its class names.

    Returns:
      (decoder: [z (B, latent_dim), y (B, 10)] -> x_mean (B, 28, 28, 1), classes: "0".."9").

    Raises:
      KVAEError: not a finished run, an unconditional run, or classes other than the ten digits.
    """
    from kvae import runs

    run = runs.check_run(run, needs=("decoder.keras",))
    try:  # read as JSON, not as a kvae Config: any run folder's config.json will do
        config = read_json_object(run / runs.CONFIG)
    except ValueError as e:
        raise KVAEError(str(e)) from None
    if config.get("conditional") is not True:
        raise KVAEError(f"{run} is an unconditional run (its config.json has no \"conditional\": "
                        "true); this benchmark needs one trained with python -m kvae.fit "
                        "--conditional")
    classes = [str(c) for c in runs.read_metrics(run).get("classes") or DIGITS]
    if classes != DIGITS:
        raise KVAEError(f"{run}'s classes are {classes[:12]}, not the digits 0..9: the digit "
                        "classifier can only judge a run trained on MNIST digits")
    import kvae.model  # noqa: F401  (registers kvae's layers for loading)

    decoder = runs.load_keras(run / "decoder.keras")
    names = [_name(t) for t in decoder.inputs]
    if sorted(names) != ["y", "z"]:
        raise KVAEError(f"{run}/decoder.keras takes inputs {names}, not z and y: is it a "
                        "conditional run's decoder?")
    shape = tuple(decoder.inputs[names.index("y")].shape[1:])
    if shape != (10,):
        raise KVAEError(f"{run}/decoder.keras takes y of shape {shape}, not (10,)")
    return decoder, classes


def _name(tensor) -> str:
    return str(getattr(tensor, "name", "")).split(":")[0]


def decode(decoder, z: np.ndarray, y: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """x_mean (N, 28, 28, 1) in [0, 1] for latents z (N, latent_dim) and one-hot y (N, 10)."""
    names = [_name(t) for t in decoder.inputs]
    parts = []
    for i in range(0, len(z), batch_size):
        given = {"z": z[i:i + batch_size], "y": y[i:i + batch_size]}
        out = decoder.predict_on_batch([given[name] for name in names])
        if isinstance(out, dict):
            out = out["x_mean"]
        elif isinstance(out, (list, tuple)):
            out = out[0]
        parts.append(np.asarray(out, np.float32))
    x = np.concatenate(parts)
    if x.shape[1:] != (28, 28, 1):
        raise KVAEError(f"the decoder gives images of shape {x.shape[1:]}, not (28, 28, 1)")
    return np.clip(x, 0.0, 1.0)


def measure(decoder, classes: list[str], model, real: digits.Digits, n: int = 100,
            seed: int = 0) -> dict:
    """The share of each class's n samples labelled as that class, and the quality measures.

    Args:
      decoder, classes: from `open_run`.
      model: the digit classifier (`digits.classifier`).
      real: its `digits.Digits` (held-out and training digits for the Frechet distance).
      n: samples per class.
      seed: numpy seed of the latents.

    Returns:
      {"n", "seed", "per_class": [...], "overall": {...}, "goal": {...}}.
    """
    latent_dim = int(decoder.inputs[[_name(t) for t in decoder.inputs].index("z")].shape[-1])
    rng = np.random.default_rng(seed)
    samples, wanted = [], []
    for c in range(len(classes)):
        z = rng.standard_normal((n, latent_dim)).astype(np.float32)
        y = np.zeros((n, len(classes)), np.float32)
        y[:, c] = 1.0
        samples.append(decode(decoder, z, y))
        wanted.append(np.full(n, c))
    samples, wanted = np.concatenate(samples), np.concatenate(wanted)
    features, probs = digits.embed(model, samples)
    labels, top = probs.argmax(1), probs.max(1)
    per_class = []
    for c, name in enumerate(classes):
        mine = wanted == c
        per_class.append({"class": name, "labelled_as_class": float(np.mean(labels[mine] == c)),
                          "confidently_labelled_as_class": float(np.mean(
                              (labels[mine] == c) & (top[mine] >= digits.CONFIDENT))),
                          **digits.summarize_probs(probs[mine])})
    overall = {"labelled_as_class": float(np.mean(labels == wanted)),
               "confidently_labelled_as_class": float(np.mean(
                   (labels == wanted) & (top >= digits.CONFIDENT))),
               "worst_class": min(per_class, key=lambda r: r["labelled_as_class"])["class"],
               **digits.summarize_probs(probs),
               "frechet": digits.frechet_distance(features, digits.embed(model, real.x_val)[0]),
               "frechet_floor": digits.frechet_floor(model, real.x_val, real.x_vae_train,
                                                     len(samples), seed)}
    share = overall["labelled_as_class"]
    goal = {"text": f"samples drawn for class c are labelled c by the classifier: >= {GOAL:.0%}",
            "target": GOAL, "measured": share, "pass": bool(share >= GOAL)}
    return {"n": n, "seed": seed, "per_class": per_class, "overall": overall, "goal": goal}


def report(result: dict) -> str:
    """The printed table of a `measure` result."""
    lines = [f"{'class':>5}  labelled c  (p >= 0.9)  mean max-p  most common labels"]
    for r in result["per_class"]:
        counts = r["class_histogram"]
        shown = ", ".join(f"{d}: {counts[d]}" for d in np.argsort(counts)[::-1][:3] if counts[d])
        lines.append(f"{r['class']:>5}  {r['labelled_as_class']:10.3f}  "
                     f"{r['confidently_labelled_as_class']:10.3f}  {r['mean_max_prob']:10.3f}  "
                     f"{shown}")
    o, g = result["overall"], result["goal"]
    lines.append(f"overall {o['labelled_as_class']:.3f} labelled as their class (worst: "
                 f"{o['worst_class']}); predicted-class entropy {o['class_entropy_bits']:.2f} bits "
                 f"(even: 3.32); Frechet {o['frechet']:.2f} (real digits: "
                 f"{o['frechet_floor']:.2f})")
    lines.append(f"{'PASS' if g['pass'] else 'MISS'}: {g['text']} (measured {g['measured']:.1%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from kvae.cli import ArgumentParser, cli_errors

    parser = ArgumentParser(prog="python bench/conditional.py",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder trained with python -m kvae.fit --conditional")
    parser.add_argument("--n", type=int, default=100, help="samples per class (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents (default 0)")
    digits.add_classifier_flags(parser)
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be at least 2")
    with cli_errors("bench/conditional.py"):
        decoder, classes = open_run(args.run)
        model, real, info = digits.classifier(args.classifier_data, args.data_dir)
        print(f"classifier: {info['note']}; validation accuracy {info['val_accuracy']:.3f}")
        result = measure(decoder, classes, model, real, args.n, args.seed)
        print(report(result))
        config = read_json_object(Path(args.run) / "config.json")
        # the run's own -log P(X|y) (RUN/metrics.json "eval": `python -m kvae.evaluate RUN --k 1000`
        # puts the k = 1000 estimate there), next to what the classifier says of its samples
        evaluation = read_json_object(Path(args.run) / "metrics.json").get("eval")
        result = {"command": " ".join(["python", "bench/conditional.py", *(argv or sys.argv[1:])]),
                  "machine": machine.describe(), "run": str(args.run), "run_config": config,
                  "run_eval": evaluation, "classifier": info, **result}
        RESULTS.mkdir(exist_ok=True)
        name = "conditional.json" if args.classifier_data == "mnist-5k" else \
            f"conditional-{args.classifier_data}.json"
        atomic_write_json(RESULTS / name, result)


if __name__ == "__main__":
    main()
