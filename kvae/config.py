"""One frozen dataclass describes a training run; CLI flags are derived from it.

Precedence: dataclass defaults < `--config FILE` (JSON) < command-line flags.
Unknown keys and wrong types are errors (`ConfigError`), never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from kvae.errors import KVAEError

ARCHS = ("conv", "resnet", "mlp")
CONV_ARCHS = ("conv", "resnet")  # the convolutional ones
LIKELIHOODS = ("bernoulli", "gaussian")
BINARIZE = ("auto", "dynamic", "static", "none")
STRATEGIES = ("none", "mirrored", "multi-worker")
CONDITIONAL_BETA = 1.25  # the default KL weight of a conditional model (docs/benchmarks.md, "Conditional")


class ConfigError(KVAEError):
    """A configuration value or file is invalid."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run (saved as `config.json` in the run folder)."""

    # Data
    dataset: str = "mnist-5k"  # mnist-5k (embedded), a TFDS name, an image folder or an .npz file
    data_dir: str | None = None  # TFDS data directory (pre-downloaded data lives here)
    val_size: int = 500  # validation examples (a fixed split; never trained on; picks the best epoch)
    binarize: str = "auto"  # dynamic | static | none; auto = dynamic for bernoulli, none for gaussian
    image_size: int | None = None  # center-crop to a square, resize to N x N (celeb_a: 64); default: as stored
    cache: str = "none"  # cache decoded streamed images (folders, big TFDS): none | memory | PATH prefix
    conditional: bool = False  # condition on the class label: Q(z|X,y), P(X|z,y) (Doersch section 4)
    # Model
    arch: str | None = None  # resnet (conv's encoder, a decoder with residual blocks), conv (Conv2D / Conv2DTranspose only) or mlp; default resnet (measured best), conv with --conditional (what its defaults were measured on)
    latent_dim: int = 32  # size of z
    hidden: int = 256  # width of the dense layer(s) next to z
    filters: int = 16  # conv: channels of the first conv layer (the second has twice as many)
    likelihood: str = "bernoulli"  # P(X|z): bernoulli on pixels or gaussian with fixed sigma
    sigma: float = 0.1  # standard deviation of the gaussian likelihood (ignored for bernoulli)
    beta: float | None = None  # weight of the KL term D[Q(z|X) || P(z)]; default 1 (the ELBO), 1.25 with --conditional (z then leaves the class to y)
    dropout: float = 0.0  # Dropout rate after each hidden layer of the encoder and decoder (training only; 0 = none)
    encoder_noise: float = 0.0  # std of Gaussian noise on the encoder's input in training (amortized inference regularization; 0 = none)
    free_bits: float = 0.0  # nats per latent dimension the KL term leaves unpenalized (Kingma et al. 2016; 0 = the plain KL)
    prior_mixture: int | None = None  # components of the prior P(z), a mixture of diagonal Gaussians learned with the model (0 = N(0, I)); default 256 (2.2 nats better held out, better samples: docs/benchmarks.md), 0 with --conditional
    prior_components: int | None = None  # Gaussian-mixture components of a sampling prior fitted to the training codes after training, for a model whose P(z) is N(0, I) (prior.json; 0 = sample from N(0, I)); default 100 with --prior-mixture 0 (unconditional), else 0 (a learned prior is sampled itself)
    kl_warmup: int | None = None  # epochs over which beta ramps linearly from beta/kl_warmup up to beta; default 64 (80% of the run: long ramps measured best), 0 with --conditional (a ramp lets z carry the class)
    # Optimisation
    epochs: int | None = None  # passes over the training split; default 80 (with the learned prior, what fits issue 16's time budget), 100 with --conditional (what its defaults were measured with)
    batch_size: int = 64  # examples per gradient step
    lr: float = 2e-3  # Adam learning rate (start of the cosine schedule)
    lr_schedule: str = "cosine"  # cosine (decay to 10% over the run) or constant
    seed: int = 0  # seeds weights, shuffling, binarization and eps: same seed -> same run on CPU
    jit: bool | None = None  # XLA-compile the train step; default: on with a GPU, off on CPU (2x slower there)
    steps_per_execution: int = 8  # train steps per compiled call (at most; a divisor of the epoch's steps; 1 under --strategy)
    mixed_precision: bool = False  # float16 compute on GPU (posterior, KL and likelihood stay float32)
    strategy: str = "none"  # none | mirrored (all local GPUs) | multi-worker (machines in TF_CONFIG)
    # Output
    out: str = "runs/quickstart"  # run folder
    eval_k: int = 100  # importance samples for the end-of-training NLL estimate (0 = skip)

    def __post_init__(self):
        check = [
            (self.latent_dim >= 1, "--latent-dim must be a positive integer"),
            (self.hidden >= 1, "--hidden must be a positive integer"),
            (self.filters >= 1, "--filters must be a positive integer"),
            (self.epochs is None or self.epochs >= 1, "--epochs must be a positive integer"),
            (self.batch_size >= 1, "--batch-size must be a positive integer"),
            (self.steps_per_execution >= 1, "--steps-per-execution must be a positive integer"),
            (self.val_size >= 1, "--val-size must be a positive integer"),
            (self.image_size is None or self.image_size >= 1, "--image-size must be a positive integer"),
            (self.cache.strip() != "", "--cache must be none, memory or a path prefix"),
            (self.kl_warmup is None or self.kl_warmup >= 0, "--kl-warmup must be >= 0"),
            (self.eval_k >= 0, "--eval-k must be >= 0"),
            (self.lr > 0, "--lr must be > 0"),
            (self.sigma > 0, "--sigma must be > 0"),
            (self.beta is None or self.beta >= 0, "--beta must be >= 0"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.encoder_noise >= 0, "--encoder-noise must be >= 0"),
            (self.free_bits >= 0, "--free-bits must be >= 0"),
            (self.prior_components is None or self.prior_components >= 0, "--prior-components must be >= 0"),
            (self.prior_mixture is None or self.prior_mixture >= 0, "--prior-mixture must be >= 0"),
            (not (self.resolved_prior_mixture and self.free_bits),
             "--free-bits is per latent dimension of a KL against N(0, I): use it with --prior-mixture 0"),
            (not (self.resolved_prior_mixture and self.prior_components),
             "--prior-components fits a sampling prior to a model whose P(z) is N(0, I); with --prior-mixture "
             "the model samples from its own learned prior: pass --prior-mixture 0 to fit one"),
            (self.arch is None or self.arch in ARCHS, f"--arch must be one of {', '.join(ARCHS)}"),
            (self.likelihood in LIKELIHOODS, f"--likelihood must be one of {', '.join(LIKELIHOODS)}"),
            (self.binarize in BINARIZE, f"--binarize must be one of {', '.join(BINARIZE)}"),
            (self.lr_schedule in ("cosine", "constant"), "--lr-schedule must be cosine or constant"),
            (self.strategy in STRATEGIES, f"--strategy must be one of {', '.join(STRATEGIES)}"),
            (not (self.likelihood == "bernoulli" and self.binarize == "none"),
             "--likelihood bernoulli needs binary pixels: use --binarize dynamic or static"),
        ]
        for ok, message in check:
            if not ok:
                raise ConfigError(f"{message} (got {self._value_for(message)})")

    def _value_for(self, message: str) -> str:
        name = message.split()[0].lstrip("-").replace("-", "_")
        return repr(getattr(self, name, None))

    def resolved(self) -> "Config":
        """This config with its mode-dependent defaults (epochs, beta, kl_warmup, arch, prior_mixture,
        prior_components) filled in: what a run saves as config.json, so the folder says what it
        trained with and a resume keeps it."""
        return dataclasses.replace(self, epochs=self.resolved_epochs, beta=self.resolved_beta,
                                   kl_warmup=self.resolved_kl_warmup,
                                   arch=self.resolved_arch, prior_mixture=self.resolved_prior_mixture,
                                   prior_components=self.resolved_prior_components)

    @property
    def resolved_arch(self) -> str:
        """The architecture actually used: resnet, or conv for a conditional model (whose
        defaults, beta and warm-up, were measured with it: docs/benchmarks.md)."""
        if self.arch is not None:
            return self.arch
        return "conv" if self.conditional else "resnet"

    @property
    def resolved_epochs(self) -> int:
        """The epochs actually trained: 80, or 100 for a conditional model (its defaults were
        measured over 100)."""
        if self.epochs is not None:
            return self.epochs
        return 100 if self.conditional else 80

    @property
    def resolved_prior_mixture(self) -> int:
        """The learned prior's components actually used: 256, or 0 (P(z) = N(0, I)) for a
        conditional model (whose defaults were measured with N(0, I))."""
        if self.prior_mixture is not None:
            return self.prior_mixture
        return 0 if self.conditional else 256

    @property
    def resolved_prior_components(self) -> int:
        """The sampling prior's components actually fitted: 100 for a model whose P(z) is N(0,
        I); 0 with a learned prior (sampled itself) and for a conditional model, whose
        class-by-class samples were measured from N(0, I)."""
        if self.prior_components is not None:
            return self.prior_components
        return 0 if self.conditional or self.resolved_prior_mixture else 100

    @property
    def resolved_beta(self) -> float:
        """The KL weight actually used (resolves the default): 1, the ELBO, or CONDITIONAL_BETA
        for a conditional model: the class then comes from y rather than z, so samples drawn for
        a class are of that class (docs/training.md, "Conditional models")."""
        if self.beta is not None:
            return float(self.beta)
        return CONDITIONAL_BETA if self.conditional else 1.0

    @property
    def resolved_kl_warmup(self) -> int:
        """The KL warm-up actually used (resolves the default): 64 epochs, or none for a
        conditional model, whose z would otherwise take the class in the cheap-KL early epochs
        and leave y unread (docs/training.md, "Conditional models")."""
        if self.kl_warmup is not None:
            return self.kl_warmup
        return 0 if self.conditional else 64

    @property
    def resolved_binarize(self) -> str:
        """The binarization actually used (resolves `auto`)."""
        if self.binarize != "auto":
            return self.binarize
        return "dynamic" if self.likelihood == "bernoulli" else "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        from kvae.files import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        return cls(**_checked(values))

    @classmethod
    def from_json(cls, path: str | Path) -> "Config":
        return cls.from_dict(_read_object(path))

    @classmethod
    def from_run(cls, path: str | Path) -> "Config":
        """A run folder's saved config.json (`path`: the file). A run saved before learned
        priors has no prior_mixture: it trained with P(z) = N(0, I), so it reads as 0."""
        return cls.from_dict({"prior_mixture": 0, **_read_object(path)})


def _read_object(path: str | Path) -> dict:
    """The JSON object in a config file, or ConfigError in one line."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return values


def _types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    out = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if args else hint
    return out


def _checked(values: dict) -> dict:
    """Rejects unknown keys and values of the wrong type."""
    types = _types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    for key, value in values.items():
        want = types[key]
        if value is None and getattr(Config, key, 0) is None:  # fields whose default is None
            continue
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"config key {key!r} must be {want.__name__}, got {value!r}")
    return {k: float(v) if types[k] is float and v is not None else v for k, v in values.items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help_lines() -> dict[str, str]:
    """Reads the one-line comment after each field in this file: the flag's --help text."""
    import inspect

    helps = {}
    for line in inspect.getsource(Config).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and "=" in line:
            name = line.split(":", 1)[0].strip()
            helps[name] = line.split("#", 1)[1].strip()
    return helps


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per Config field; unset flags stay None so a config file can fill them."""
    helps = _help_lines()
    defaults = Config()
    for name, kind in _types().items():
        default = getattr(defaults, name)
        shown = "" if default is None and "default" in helps.get(name, "") else f" (default: {default})"
        text = f"{helps.get(name, '')}{shown}".replace("%", "%%")
        if kind is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            parser.add_argument(_flag(name), dest=name, type=kind, default=None, help=text,
                                metavar=name.upper())


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """defaults < base (a config file or a resumed run) < flags given on the command line."""
    values = (base or Config()).to_dict()
    for name in _types():
        flag_value = getattr(args, name, None)
        if flag_value is not None:
            values[name] = flag_value
    return Config.from_dict(values)
