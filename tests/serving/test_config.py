"""segmask.serving.config: ServeConfig's defaults and its checks on construction, importable without torch
or FastAPI (``segmask serve --help`` shows its fields at once)."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import heavy_imports

from segmask.serving.config import ServeConfig


def test_defaults():
    config = ServeConfig()
    assert (config.max_batch, config.max_queue, config.max_context, config.prefix_cache_mb) == (
        8,
        64,
        None,
        256.0,
    )
    assert (config.api_key, config.model_name, config.retry_after_s, config.causal_sink) == (
        None,
        "segmask",
        1,
        None,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_batch = 2  # type: ignore[misc]


def test_limits_must_be_positive_and_keys_sendable():
    for bad in ({"max_messages": 0}, {"max_prompt_chars": 0}, {"max_prompt_tokens": -1}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be >= 1"):
            ServeConfig(**bad)
    for key in (" sekret", "sekret\n", ""):
        with pytest.raises(ValueError, match="api_key"):
            ServeConfig(api_key=key)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"max_batch": 0}, "max_batch must be >= 1, got 0"),
        ({"max_queue": 0}, "max_queue must be >= 1, got 0"),
        ({"retry_after_s": 0}, "retry_after_s must be >= 1, got 0"),
        ({"max_context": 1}, "max_context must be >= 2, got 1"),
        ({"prefix_cache_mb": -1.0}, "prefix_cache_mb must be >= 0, got -1.0"),
        ({"model_name": ""}, "model_name must be non-empty"),
        ({"causal_sink": 1}, "causal_sink must be true, false or None, got 1"),
    ],
)
def test_each_bad_setting_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(**bad)


def test_the_smallest_settings_are_accepted():
    config = ServeConfig(max_batch=1, max_queue=1, max_context=2, prefix_cache_mb=0.0, causal_sink=False)
    assert (config.max_context, config.prefix_cache_mb, config.causal_sink) == (2, 0.0, False)


def test_importing_the_config_loads_no_heavy_library():
    assert heavy_imports("segmask.serving.config") == []
