"""Config: defaults, JSON round trip, validation, and flag precedence."""

import json
import re

import pytest

from kvae.config import Config, ConfigError, add_config_flags, config_from_args


def test_json_round_trip(tmp_path):
    config = Config(latent_dim=3, arch="mlp", beta=0.5, data_dir="/data")
    config.to_json(tmp_path / "c.json")
    assert Config.from_json(tmp_path / "c.json") == config


@pytest.mark.parametrize("values, message", [
    ({"latent_dim": -2}, "--latent-dim must be a positive integer"),
    ({"latent_dim": 0}, "--latent-dim must be a positive integer"),
    ({"arch": "densenet"}, "--arch must be one of"),
    ({"dropout": 1.0}, "--dropout must be in"),
    ({"dropout": -0.1}, "--dropout must be in"),
    ({"encoder_noise": -1.0}, "--encoder-noise must be >= 0"),
    ({"free_bits": -0.5}, "--free-bits must be >= 0"),
    ({"prior_components": -1}, "--prior-components must be >= 0"),
    ({"likelihood": "poisson"}, "--likelihood must be one of"),
    ({"sigma": 0.0}, "--sigma must be > 0"),
    ({"likelihood": "bernoulli", "binarize": "none"}, "needs binary pixels"),
])
def test_invalid_values(values, message):
    with pytest.raises(ConfigError, match=message):
        Config(**values)


def test_unknown_key_and_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        Config.from_dict({"latent_dimm": 3})
    with pytest.raises(ConfigError, match="must be int"):
        Config.from_dict({"latent_dim": "3"})
    with pytest.raises(ConfigError, match="must be int"):
        Config.from_dict({"epochs": True})
    assert Config.from_dict({"lr": 1}).lr == 1.0  # an int is a fine float
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        Config.from_json(tmp_path / "bad.json")


def test_precedence_defaults_file_flags(tmp_path):
    import argparse

    (tmp_path / "c.json").write_text(json.dumps({"latent_dim": 4, "epochs": 7}))
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--epochs", "9", "--no-jit"])
    config = config_from_args(args, Config.from_json(tmp_path / "c.json"))
    assert (config.latent_dim, config.epochs, config.jit, config.resolved_beta) == (4, 9, False, 1.0)


def test_conditional_defaults_resolve_beta_and_warmup():
    """beta and the KL warm-up default by mode (docs/benchmarks.md, "Conditional"); a value given
    is kept, and the JSON round trip keeps the unset ones unset."""
    from kvae.config import CONDITIONAL_BETA

    assert (Config().resolved_beta, Config().resolved_kl_warmup) == (1.0, 64)
    conditional = Config(conditional=True)
    assert (conditional.resolved_beta, conditional.resolved_kl_warmup) == (CONDITIONAL_BETA, 0)
    given = Config(conditional=True, beta=1.0, kl_warmup=10)
    assert (given.resolved_beta, given.resolved_kl_warmup) == (1.0, 10)
    assert Config.from_dict(Config().to_dict()) == Config()
    with pytest.raises(ConfigError, match="--beta must be >= 0"):
        Config(beta=-1.0)


def test_help_explains_every_flag(capsys):
    from kvae.fit import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset", "--out", "--epochs", "--batch-size", "--latent-dim", "--arch",
                 "--likelihood", "--sigma", "--beta", "--kl-warmup", "--lr", "--seed", "--config",
                 "--resume"):
        assert flag in text
    assert "size of z" in text  # the field's comment became its help


def test_mode_dependent_defaults_resolve():
    """resnet and a learned prior of 256 components by default (no fitted one); conv and N(0, I)
    under --conditional (what its defaults were measured with); a fitted prior of 100 components
    for a model with N(0, I); given values are kept."""
    plain, conditional = Config(), Config(conditional=True)
    assert (plain.resolved_arch, plain.resolved_prior_mixture, plain.resolved_prior_components) == ("resnet", 256, 0)
    assert (conditional.resolved_arch, conditional.resolved_prior_mixture,
            conditional.resolved_prior_components) == ("conv", 0, 0)
    assert Config(prior_mixture=0).resolved_prior_components == 100
    mine = Config(conditional=True, arch="resnet", prior_components=7)
    assert (mine.resolved_arch, mine.resolved_prior_components) == ("resnet", 7)
    assert Config(conditional=True, prior_mixture=5).resolved().prior_mixture == 5
    saved = Config(conditional=True).resolved()
    assert (saved.arch, saved.prior_components, saved.beta, saved.kl_warmup) == ("conv", 0, 1.25, 0)
    assert (Config().resolved().prior_mixture, Config().resolved().prior_components) == (256, 0)
    assert [(c.epochs, c.kl_warmup) for c in (Config().resolved(), saved, Config(epochs=7).resolved())] == [
        (80, 64), (100, 0), (7, 64)]


@pytest.mark.parametrize("values,message", [
    ({"free_bits": 0.1}, "--free-bits is per latent dimension of a KL against N(0, I): use it with --prior-mixture 0"),
    ({"prior_components": 10}, "--prior-components fits a sampling prior to a model whose P(z) is N(0, I)"),
    ({"prior_mixture": -1}, "--prior-mixture must be >= 0"),
])
def test_a_learned_prior_refuses_what_needs_n01(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(**values)
    if "prior_mixture" not in values:  # both fine with P(z) = N(0, I)
        Config(**values, prior_mixture=0)
