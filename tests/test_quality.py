"""bench/quality.py: the side-by-side comparison with the previous defaults, and its sample measures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench_scripts import load_script

quality = load_script("quality")


def test_previous_defaults_differ_from_todays_only_where_named():
    from kvae.config import Config

    today = Config(out="runs/x", epochs=3)
    previous = quality.previous_defaults(today)
    assert previous.out == "runs/x-previous" and previous.epochs == 3
    changed = {k for k, v in previous.to_dict().items() if v != today.to_dict()[k]}
    given = {k for k in quality.SCHEDULE if getattr(today, k) is not None}  # --epochs 3: both train 3
    assert changed == {"out"} | {k for k, v in quality.PREVIOUS.items() if getattr(today, k) != v} - given
    assert (previous.epochs, previous.kl_warmup) == (3, 80)
    assert (quality.previous_defaults(Config()).epochs, Config().resolved_epochs) == (100, 80)
    assert changed - {"out"}, "today's defaults are the previous ones: PREVIOUS names what changed"
    assert previous.prior_components == previous.prior_mixture == 0  # the previous quickstart: N(0, I) only


@pytest.mark.slow
def test_compare_trains_both_and_records_the_time_ratio(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quality.main(["--compare", "--every", "1", "--k", "5", "--samples", "40", "--epochs", "2",
                  "--latent-dim", "4", "--hidden", "16", "--filters", "4", "--eval-k", "0",
                  "--out", str(tmp_path / "q"), "--results", str(tmp_path / "results")])
    result = json.loads((tmp_path / "results" / "quality.json").read_text())
    previous, current = result["previous"], result
    assert previous["config"]["out"] == str(tmp_path / "q-previous")
    for key, value in quality.PREVIOUS.items():  # --epochs 2 given: both sides train 2
        assert previous["config"][key] == (2 if key == "epochs" else value), key
    assert current["config"]["epochs"] == 2
    assert result["time_ratio"] == pytest.approx(current["train_seconds"] / previous["train_seconds"])
    for r in (previous, current):
        assert [p["epoch"] for p in r["curve"]] == [1, 2]
        assert r["final"]["k"] == 5 and np.isfinite(r["final"]["nll"])
        assert r["samples"]["standard"]["n"] == 40
    assert "fitted" not in previous["samples"] and "fitted" in current["samples"]
    assert 0 <= current["samples"]["fitted"]["confident_share"] <= 1
    assert (tmp_path / "results" / "quality.png").stat().st_size > 0
