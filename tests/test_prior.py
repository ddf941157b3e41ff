"""The priors in prior.json (kvae.prior): the learned P(z) (the default: trained with the model,
the prior of every NLL) and the sampling prior fitted to the training codes of a model with
P(z) = N(0, I); written by kvae.fit, exported with the decoder, sampled by kvae.runtime,
kvae.sample and (tests/test_demo.py) the demo; N(0, I) with prior="standard"."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kvae import contract
from kvae import prior as kprior
from reference import reference_nll

FITTED = {"prior_mixture": 0}  # a model with P(z) = N(0, I) and a fitted sampling prior (100 components)


def mixture(rng, n=6000):
    """Codes from a known 3-component mixture in 4 dimensions."""
    weights = np.array([0.2, 0.3, 0.5])
    loc = np.array([[-4.0, 0, 1, 2], [0, 4, -1, 0], [4, -2, 0, -3]])
    scale = np.array([[0.5, 1, 0.3, 0.8], [1, 0.4, 0.6, 0.5], [0.7, 0.7, 1.2, 0.3]])
    which = rng.choice(3, n, p=weights)
    return loc[which] + scale[which] * rng.standard_normal((n, 4)), (weights, loc, scale)


def test_fit_recovers_a_known_mixture():
    codes, (weights, loc, scale) = mixture(np.random.default_rng(0))
    fitted = kprior.fit(codes, 3, seed=1, restarts=3)  # one start of seed 1 puts two in one cluster
    order = np.argsort(np.asarray(fitted["loc"])[:, 0])  # the true components sort by loc[:, 0]
    np.testing.assert_allclose(np.asarray(fitted["weights"])[order], weights, atol=0.02)
    np.testing.assert_allclose(np.asarray(fitted["loc"])[order], loc, atol=0.1)
    np.testing.assert_allclose(np.asarray(fitted["scale"])[order], scale, rtol=0.1)
    # EM's fixed point: the mixture's mean is the codes' mean
    mean = np.asarray(fitted["weights"]) @ np.asarray(fitted["loc"])
    np.testing.assert_allclose(mean, codes.mean(0), atol=1e-3)
    assert kprior.log_density(fitted, codes).mean() > kprior.log_density(kprior.fit(codes, 1), codes).mean() + 1


def test_sample_draws_components_by_weight():
    rng = np.random.default_rng(0)
    codes, (weights, loc, _) = mixture(rng)
    fitted = kprior.fit(codes, 3, seed=1, restarts=3)
    z = kprior.sample(fitted, rng.standard_normal((20000, 4)).astype(np.float32), rng)
    assert z.dtype == np.float32 and z.shape == (20000, 4)
    nearest = np.argmin(((z[:, None, :2] - loc[None, :, :2]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(np.bincount(nearest, minlength=3) / len(z), weights, atol=0.02)
    np.testing.assert_allclose(z.mean(0), codes.mean(0), atol=0.1)


@pytest.mark.parametrize("change", [
    {"kind": "full"}, {"weights": [1.0, -1.0]}, {"scale": [[1.0] * 3, [0.0] * 3]},
    {"loc": [[0.0] * 2, [0.0] * 2]}, {"weights": None}, {"loc": [[float("nan")] * 3] * 2},
])
def test_check_refuses_what_is_not_a_prior(change):
    good = {"kind": kprior.KIND, "weights": [0.5, 0.5], "loc": [[0.0] * 3] * 2, "scale": [[1.0] * 3] * 2}
    assert kprior.check(good, 3, "p.json") is good
    with pytest.raises(ValueError, match="p.json is not a kvae prior over 3 latent dimensions"):
        kprior.check({**good, **change}, 3, "p.json")


def training_codes(run):
    """kvae.fit.training_codes of a run folder's saved VAE."""
    from kvae import data as kdata
    from kvae.config import Config
    from kvae.fit import training_codes as codes_of
    from kvae.model import load_vae

    config = Config.from_json(run / "config.json")
    data = kdata.load(config.dataset, val_size=config.val_size)
    return codes_of(load_vae(run / "vae.keras"), data, config), config


def test_fit_writes_the_prior_of_the_training_codes(trained_run):
    run = trained_run("conv", **FITTED)
    fitted = kprior.read(run / contract.PRIOR, 8)
    codes, config = training_codes(run)
    assert len(fitted["weights"]) == config.prior_components == 100
    assert str(len(codes)) in fitted["fitted_on"] and kprior.model_prior(fitted) is None
    mean = np.asarray(fitted["weights"]) @ np.asarray(fitted["loc"])
    np.testing.assert_allclose(mean, codes.mean(0), atol=1e-3)  # fitted to these codes
    spread = np.asarray(fitted["weights"]) @ (np.square(fitted["scale"]) + np.square(fitted["loc"]))
    np.testing.assert_allclose(spread - mean ** 2, codes.var(0), rtol=1e-2, atol=1e-4)


def test_export_carries_the_prior_and_the_runtime_samples_from_it(exported_run):
    from kvae.runtime import VAE, Decoder

    run = exported_run("conv")
    export = run / "export"
    assert (export / contract.PRIOR).read_bytes() == (run / contract.PRIOR).read_bytes()
    manifest = contract.read_manifest(export)
    assert manifest["prior"] == {"file": contract.PRIOR, "sha256": contract.sha256(export / contract.PRIOR),
                                 "components": 256}  # the learned prior (the default)
    fitted = kprior.read(export / contract.PRIOR, 8)
    for fmt in ("onnx", "tflite"):
        decoder = Decoder(export / f"decoder.{fmt}")
        assert decoder.prior == fitted and decoder.sampling_prior == "fitted"
        rng = np.random.default_rng(3)
        z = kprior.sample(fitted, rng.standard_normal((5, 8), dtype=np.float32), rng)
        np.testing.assert_array_equal(decoder.sample(5, seed=3), decoder.decode(z))
        np.testing.assert_array_equal(decoder.sample(5, seed=3, prior="standard"),
                                      decoder.decode(np.random.default_rng(3).standard_normal((5, 8), dtype=np.float32)))
    vae = VAE.from_folder(run)
    np.testing.assert_array_equal(vae.sample(4, seed=1), Decoder(export / "decoder.onnx").sample(4, seed=1))
    assert not np.array_equal(vae.sample(4, seed=1), vae.sample(4, seed=1, prior="standard"))
    with pytest.raises(Exception, match="prior must be one of fitted, standard"):
        vae.sample(2, prior="gmm")


def test_fitted_prior_draws_where_the_codes_are(trained_run, tmp_path):
    """The point of the prior: its z lie where the training codes lie (higher density under a
    mixture fitted to other training codes) more than N(0, I)'s do."""
    from kvae import export_onnx
    from kvae.runtime import Decoder

    run = trained_run("conv", **FITTED)
    export_onnx.export_onnx(run, tmp_path, quantize=())
    decoder = Decoder(tmp_path / "decoder.onnx")
    codes, _ = training_codes(run)
    judge = kprior.fit(codes[1::2], 10, seed=5)  # a coarser mixture of half the codes
    fitted, standard = (decoder.draw_z(2000, seed=0, prior=p) for p in ("fitted", "standard"))
    assert kprior.log_density(judge, fitted).mean() > kprior.log_density(judge, standard).mean() + 1


def test_tampered_or_missing_prior_fails_sampling_only_in_one_line(exported_run, tmp_path):
    """A decoder copied without its prior.json (or with another one) still decodes and samples
    from N(0, I); only sampling from the fitted prior refuses, in one line."""
    from kvae.runtime import Decoder, RuntimeInputError

    folder = tmp_path / "export"
    shutil.copytree(exported_run("conv") / "export", folder)
    fitted = json.loads((folder / contract.PRIOR).read_text())
    fitted["weights"][0] += 0.01
    (folder / contract.PRIOR).write_text(json.dumps(fitted))
    for broken in ("changed", "missing"):
        if broken == "missing":
            (folder / contract.PRIOR).unlink()
        decoder = Decoder(folder / "decoder.onnx")
        assert decoder.sampling_prior == "fitted"
        assert decoder.sample(2, seed=0, prior="standard").shape == (2, 28, 28, 1)
        assert decoder.decode(np.zeros((1, 8), np.float32)).shape == (1, 28, 28, 1)
        match = "does not match the sha256" if broken == "changed" else "prior.json is missing"
        with pytest.raises(RuntimeInputError, match=match) as error:
            decoder.sample(2, seed=0)
        assert "\n" not in str(error.value)


def test_manifest_prior_entry_must_name_prior_json(exported_run, tmp_path):
    from kvae.runtime import Decoder, RuntimeInputError

    folder = tmp_path / "export"
    shutil.copytree(exported_run("conv") / "export", folder)
    manifest = json.loads((folder / contract.MANIFEST).read_text())
    for entry in ({**manifest["prior"], "file": "../prior.json"}, "prior.json"):
        (folder / contract.MANIFEST).write_text(json.dumps({**manifest, "prior": entry}))
        with pytest.raises(RuntimeInputError, match="entry must name prior.json"):
            Decoder(folder / "decoder.onnx").sample(1)


def test_without_a_prior(trained_run, tmp_path):
    """--prior-mixture 0 --prior-components 0: no prior.json, none exported, N(0, I) by default, "fitted" refused;
    a re-export of a run whose prior was deleted removes the exported copy."""
    from kvae import export_onnx
    from kvae.runtime import Decoder, RuntimeInputError

    run = trained_run("conv", prior_mixture=0, prior_components=0, epochs=1)
    assert not (run / contract.PRIOR).exists()
    out = tmp_path / "export"
    export_onnx.export_onnx(run, out, quantize=())
    assert "prior" not in contract.read_manifest(out) and not (out / contract.PRIOR).exists()
    decoder = Decoder(out / "decoder.onnx")
    assert decoder.prior is None and decoder.sampling_prior == "standard"
    with pytest.raises(RuntimeInputError, match="has no fitted prior"):
        decoder.sample(2, prior="fitted")
    # a stale copy from an export of a run that had one goes away on the next export
    shutil.copy(trained_run("conv") / contract.PRIOR, out / contract.PRIOR)
    export_onnx.export_onnx(run, out, quantize=())
    assert not (out / contract.PRIOR).exists()


def test_broken_or_stale_prior_stops_the_export_in_one_line(trained_run, tmp_path):
    from kvae import export
    from kvae.errors import KVAEError

    run = tmp_path / "run"
    shutil.copytree(trained_run("conv"), run, ignore=shutil.ignore_patterns("export"))
    good = (run / contract.PRIOR).read_text()
    assert json.loads(good)["source"] == {"encoder.keras": contract.sha256(run / "encoder.keras")}
    (run / contract.PRIOR).write_text('{"kind": "gaussian-mixture-diag", "weights": [1]}')
    with pytest.raises(KVAEError, match="is not a kvae prior over 8 latent dimensions"):
        export.load_run(run)
    # a prior fitted to another training's encoder (a --resume killed between the two writes)
    stale = json.loads(good)
    stale["source"]["encoder.keras"] = "0" * 64
    (run / contract.PRIOR).write_text(json.dumps(stale))
    with pytest.raises(KVAEError, match="was fitted to another training of this run") as error:
        export.load_run(run)
    assert "--resume" in str(error.value) and "\n" not in str(error.value)
    # a run that learned its prior needs it: without prior.json no NLL could use its P(z)
    (run / contract.PRIOR).unlink()
    with pytest.raises(KVAEError, match="learned its prior P.z. .--prior-mixture 256. but .* is missing") as error:
        export.load_run(run)
    assert "--resume" in str(error.value) and "\n" not in str(error.value)


def test_sample_cli_prior_flag(exported_run, tmp_path):
    run = exported_run("conv")
    outputs = {}
    for prior in ("fitted", "standard", None):
        out = tmp_path / f"{prior}.npy"
        argv = [sys.executable, "-m", "kvae.sample", str(run), "--n", "3", "--seed", "0", "--out", str(out)]
        result = subprocess.run(argv + (["--prior", prior] if prior else []), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"{prior or 'fitted'} prior" in result.stdout
        outputs[prior] = np.load(out)
    np.testing.assert_array_equal(outputs[None], outputs["fitted"])
    assert not np.array_equal(outputs["fitted"], outputs["standard"])


# ---------------------------------------------------------------- the learned prior (the default)


def test_learned_prior_is_the_p_z_of_every_nll(exported_run):
    """The default run learns P(z) (256 components): prior.json holds the trained layer's
    mixture, marked as the model's; kvae.evaluate's and kvae.runtime's NLLs both use it (each
    equals the tests' scipy estimate with the same eps, and not the N(0, I) one)."""
    from kvae import data as kdata
    from kvae.evaluate import iwae_nll
    from kvae.model import load_vae
    from kvae.runtime import VAE

    run = exported_run("conv")
    learned = kprior.read(run / contract.PRIOR, 8)
    assert kprior.model_prior(learned) is learned and len(learned["weights"]) == 256
    assert (run / "export" / contract.PRIOR).read_bytes() == (run / contract.PRIOR).read_bytes()
    vae = load_vae(run / "vae.keras")
    layer = vae.model_prior()
    for key in ("weights", "loc", "scale"):
        np.testing.assert_allclose(learned[key], layer[key], rtol=1e-6, atol=1e-7)
    assert np.std(learned["weights"]) > 0 and np.std(learned["scale"]) > 0  # trained, not the start
    x = kdata.binarize_fixed(kdata.load("mnist-5k").x_val[:20], "dynamic")
    loc, scale = (np.asarray(t) for t in vae.encode(x))
    decode = lambda z: np.asarray(vae.decode(z))  # noqa: E731
    # kvae.evaluate: eps from (seed, batch, chunk) = (0, 0, 0) for one batch and one chunk
    eps = np.random.default_rng([0, 0, 0]).standard_normal((10, 20, 8))
    want = reference_nll(x, loc, scale, eps, decode, prior=learned)
    np.testing.assert_allclose(iwae_nll(vae, x, 10)["nll"], want, rtol=1e-5)
    assert np.abs(reference_nll(x, loc, scale, eps, decode) - want).mean() > 0.1  # the prior matters
    # kvae.runtime: eps = Generator(seed).standard_normal((k, batch, latent_dim))
    runtime = VAE.from_folder(run / "export")
    assert runtime.decoder.model_prior == learned
    eps = np.random.default_rng(0).standard_normal((10, 20, 8))
    loc, scale = runtime.encoder.encode(x)
    got = -runtime.log_likelihood(x, k=10, seed=0)
    np.testing.assert_allclose(got, reference_nll(x, loc, scale, eps, runtime.decoder.decode, prior=learned), rtol=1e-5)
    assert "learned prior" in contract.read_manifest(run / "export")["preprocessing"]


def test_a_run_from_before_learned_priors_resumes_with_n01(tmp_path):
    """A config.json without prior_mixture (written before it existed) resumes as it trained."""
    from kvae.config import Config
    from kvae.fit import parse_args, resolve_config

    values = Config(prior_mixture=0, out=str(tmp_path)).resolved().to_dict()
    values.pop("prior_mixture")
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert resolve_config(parse_args(["--out", str(tmp_path), "--resume"])).prior_mixture == 0
    (tmp_path / "config.json").write_text(json.dumps(Config(out=str(tmp_path)).resolved().to_dict()))
    assert resolve_config(parse_args(["--out", str(tmp_path), "--resume"])).prior_mixture == 256
