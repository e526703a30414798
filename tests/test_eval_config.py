"""segmask.eval_config: EvalConfig refuses bad settings on construction (before any model loads), resolves
``causal_sink=None`` to the policy's default, and imports no torch (``segmask eval --help`` shows its fields)."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import heavy_imports

from segmask.eval_config import SCORINGS, EvalConfig
from segmask.tasks.commonsense import SUITE


def test_bad_settings_are_refused_on_construction(commonsense_dir):
    with pytest.raises(ValueError, match="unknown scoring 'vote'"):
        EvalConfig(commonsense_dir, "boolq", "mas", scoring="vote")
    with pytest.raises(ValueError, match="unknown mask policy 'full'"):
        EvalConfig(commonsense_dir, "boolq", "full", scoring="loglik")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        EvalConfig(commonsense_dir, "boolq", batch_size=0)
    with pytest.raises(ValueError, match="no tasks given"):
        EvalConfig(commonsense_dir, " , ")
    config = EvalConfig(commonsense_dir, "boolq, piqa,boolq", out=commonsense_dir / "r.json")
    assert config.tasks == ("boolq", "piqa") and config.data_dir == str(commonsense_dir)
    assert EvalConfig(commonsense_dir).tasks == SUITE and isinstance(config.out, str)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"limit": 0}, "limit must be positive, got 0"),
        ({"num_beams": 0}, "num_beams must be positive, got 0"),
        ({"max_new_tokens": -1}, "max_new_tokens must be positive, got -1"),
        ({"overflow": "wrap"}, "unknown overflow 'wrap'"),
        ({"extract": "loose"}, "unknown extractor 'loose'"),
        ({"template": "official"}, "unknown template 'official'"),
        ({"causal_sink": "on"}, "causal_sink must be true, false or None"),
    ],
)
def test_each_bad_setting_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig("data", "boolq", **bad)


def test_loglik_scoring_needs_the_alpaca_template():
    with pytest.raises(ValueError, match="loglik scoring needs template alpaca, got 'paper'"):
        EvalConfig("data", "boolq", scoring="loglik", template="paper")
    assert EvalConfig("data", "boolq", scoring="loglik", template="alpaca").template == "alpaca"
    assert EvalConfig("data", "boolq", scoring="generate", template="paper").template == "paper"
    assert SCORINGS == ("generate", "loglik")


def test_causal_sink_none_becomes_the_policys_default():
    assert EvalConfig("data", "boolq", "mas").causal_sink is True
    assert EvalConfig("data", "boolq", "prefix").causal_sink is False
    assert EvalConfig("data", "boolq", "causal", causal_sink=True).causal_sink is False  # all causal already
    assert EvalConfig("data", "boolq", "mas", causal_sink=False).causal_sink is False
    assert EvalConfig("data", "boolq", "prefix", causal_sink=True).causal_sink is True


def test_an_out_that_is_a_folder_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="is a folder; give the results file's path"):
        EvalConfig("data", "boolq", out=tmp_path)
    config = EvalConfig("data", "boolq", out=tmp_path / "new" / "r.json")
    assert config.out == str(tmp_path / "new" / "r.json") and not (tmp_path / "new").exists()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limit = 3  # type: ignore[misc]


def test_importing_the_config_loads_no_heavy_library():
    assert heavy_imports("segmask.eval_config") == []
