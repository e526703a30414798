"""Fixtures of the serving tests: stories260K (MAS) with its chat tokenizer, and a live server for them.

Module scope, as each test module had them before they moved here.
"""

from __future__ import annotations

import pytest

from .live_server import live


@pytest.fixture(scope="module")
def tokenizer(stories_tokenizer):
    return stories_tokenizer


@pytest.fixture(scope="module")
def model(stories_model):
    return stories_model


@pytest.fixture(scope="module")
def server(model, tokenizer):
    """A live server for ``model`` with the default ServeConfig."""
    with live(model, tokenizer) as server:
        yield server
