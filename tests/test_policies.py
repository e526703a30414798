"""segmask.policies: the settings' vocabulary (policies, backends, the causal-sink rule), importable without
torch so that a command's --help stays light."""

from __future__ import annotations

import pytest
from conftest import heavy_imports

from segmask.policies import (
    CAUSAL_SINK_HELP,
    CAUSAL_SINK_HELP_RUN,
    DEFAULT_CAUSAL_SINK,
    POLICIES,
    SUPPORTED,
    check_policy,
    sink_on,
)


def test_the_policies_and_backends_are_the_documented_ones():
    assert POLICIES == ("causal", "mas", "prefix")
    assert SUPPORTED == ("eager", "sdpa", "flex_attention", "segmask")


def test_check_policy_returns_a_policy_and_names_the_valid_ones_otherwise():
    for policy in POLICIES:
        assert check_policy(policy) == policy
    for bad in ("full", "MAS", ""):
        with pytest.raises(
            ValueError, match=f"unknown mask policy {bad!r}; expected one of causal, mas, prefix"
        ):
            check_policy(bad)


# (policy, causal_sink) -> whether token 0 is made causal: on under mas by default, off under prefix, never
# under causal (whose tokens are all causal already)
SINK_ON = {
    ("mas", None): True,
    ("mas", True): True,
    ("mas", False): False,
    ("prefix", None): False,
    ("prefix", True): True,
    ("prefix", False): False,
    ("causal", None): False,
    ("causal", True): False,
    ("causal", False): False,
}


def test_sink_on_per_policy_and_option():
    for (policy, causal_sink), expected in SINK_ON.items():
        assert sink_on(policy, causal_sink) is expected, (policy, causal_sink)
    assert sink_on("mas") is True and sink_on("prefix") is False and sink_on("causal") is False
    assert set(DEFAULT_CAUSAL_SINK) == set(POLICIES) == {"mas", "prefix", "causal"}
    assert DEFAULT_CAUSAL_SINK == {"mas": True, "prefix": False, "causal": False}
    for bad in ("yes", 1, 0):
        with pytest.raises(ValueError, match="causal_sink must be true, false or None"):
            sink_on("mas", bad)
    with pytest.raises(ValueError, match="unknown mask policy"):
        sink_on("full", True)


def test_the_sink_help_names_each_policys_default():
    for text in (CAUSAL_SINK_HELP, CAUSAL_SINK_HELP_RUN):
        assert "on under mas" in text and "off under prefix" in text
    assert "as the model was trained" in CAUSAL_SINK_HELP_RUN and "trained" not in CAUSAL_SINK_HELP


def test_importing_the_vocabulary_loads_no_heavy_library():
    assert heavy_imports("segmask.policies") == []
