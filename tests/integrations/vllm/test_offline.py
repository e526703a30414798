"""vLLM's offline ``LLM`` with the segmask plugin: greedy tokens equal ``segmask.generate``'s on the same
weights (mas with and without the sink, prefix, causal; Llama, Qwen2, Qwen3; batched conversations of
different lengths and a raw completion prompt); engines that would run a MAS model causally are refused.

Run by ``make test-vllm`` (its own environment, ``.venv-vllm``); skipped where vLLM is not installed."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
from conftest import STORIES, require_shared

pytest.importorskip("vllm.entrypoints", reason="vllm is not installed (make test-vllm)")

from tiny_models import (  # noqa: E402  (sets the vLLM environment before vllm is imported)
    CONVERSATIONS,
    NEW_TOKENS,
    RAW_PROMPT,
    build_model,
    segmask_tokens,
    tokenizer_folder,
    with_policy,
)
from vllm import LLM, SamplingParams  # noqa: E402

from segmask.integrations.vllm.plugin import POLICY_ENV  # noqa: E402

# exactly the engine the plugin accepts for a MAS model
ENGINE = dict(
    enforce_eager=True,
    dtype="float32",
    max_model_len=512,
    enable_prefix_caching=False,
    enable_chunked_prefill=False,
    seed=0,
)
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
# name: architecture, chat template, policy in segmask.json (None: no segmask.json), causal_sink saved,
# SEGMASK_VLLM_POLICY (None: unset)
CASES = {
    "llama-mas": ("llama", "chatml_smollm2.jinja", "mas", True, None),
    "llama-mas-paper": ("llama", "chatml_smollm2.jinja", "mas", False, None),
    "llama-prefix": ("llama", "chatml_smollm2.jinja", "prefix", False, None),
    "llama-plain": ("llama", "chatml_smollm2.jinja", None, None, None),
    "llama-env-prefix": ("llama", "chatml_smollm2.jinja", "mas", True, "prefix"),
    "qwen2-mas": ("qwen2", "qwen2_5.jinja", "mas", True, None),
    "qwen3-prefix": ("qwen3", "llama3.jinja", "prefix", True, None),
}


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("llama"), "llama", "chatml_smollm2.jinja")


@pytest.fixture(scope="module", params=list(CASES))
def served(request, tmp_path_factory):
    """(model folder, policy, the engine serving it): one engine start per case."""
    architecture, template, policy, sink, requested = CASES[request.param]
    base = build_model(tmp_path_factory.mktemp("base"), architecture, template)
    folder = with_policy(base, tmp_path_factory.mktemp(request.param) / "model", policy, sink)
    if requested is not None:  # read in this process: the engine runs in it
        os.environ[POLICY_ENV] = requested
    try:
        llm = LLM(str(folder), tokenizer=str(tokenizer_folder(folder)), **ENGINE)
    finally:
        os.environ.pop(POLICY_ENV, None)
    yield folder, requested or policy, llm
    del llm
    gc.collect()


def test_batched_chats_equal_segmask_generate(served):
    folder, policy, llm = served
    expected = segmask_tokens(folder, CONVERSATIONS, policy=policy or "causal")  # no segmask.json: unchanged
    outputs = llm.chat(CONVERSATIONS, GREEDY)  # one batch: prompts of three lengths in one step
    assert [list(output.outputs[0].token_ids) for output in outputs] == expected
    if policy is not None:  # the mask changes the answer, so a causal prefill would fail the test
        assert expected != segmask_tokens(folder, CONVERSATIONS, policy="causal")


def test_a_raw_completion_prompt_is_one_segment_as_in_segmask(served):
    folder, policy, llm = served
    [output] = llm.generate([RAW_PROMPT], GREEDY)
    assert (
        list(output.outputs[0].token_ids)
        == segmask_tokens(folder, [RAW_PROMPT], policy=policy or "causal")[0]
    )


def test_a_prompt_prefilled_beside_decoding_rows(random_llama, tmp_path, monkeypatch):
    """A token budget below the three prompts' total puts the last prompt's prefill in a step with the
    others' decoding rows (the CPU backend puts those first): its rows are found and masked there."""
    from segmask.integrations.vllm.model import MasPrefill

    folder = with_policy(random_llama, tmp_path / "model", "mas", True)
    steps = []
    plan = MasPrefill.plan

    def recorded(self, input_ids):
        plan(self, input_ids)
        if self.blocks:
            steps.append((0 if input_ids is None else len(input_ids), [(a, b) for a, b, _ in self.blocks]))

    monkeypatch.setattr(MasPrefill, "plan", recorded)
    llm = LLM(str(folder), **{**ENGINE, "max_num_batched_tokens": 512})
    outputs = llm.chat(CONVERSATIONS, GREEDY)
    assert [list(output.outputs[0].token_ids) for output in outputs] == segmask_tokens(folder, CONVERSATIONS)
    assert any(tokens > sum(b - a for a, b in blocks) for tokens, blocks in steps), steps  # a mixed step ran
    del llm
    gc.collect()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(enable_prefix_caching=True), "prefix caching"),
        (dict(enable_chunked_prefill=True), "chunked prefill"),
        (dict(enforce_eager=False), "captured forward"),
        (
            dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}),
            "speculative decoding",
        ),
    ],  # fmt: skip
)
def test_an_engine_that_would_drop_the_mask_is_refused(random_llama, tmp_path, change, message):
    folder = with_policy(random_llama, tmp_path / "model", "mas")
    with pytest.raises(Exception, match=f"segmask: .* asks for the mas mask, which .*{message}") as refused:
        LLM(str(folder), **{**ENGINE, **change})
    ours = str(refused.value).split("segmask: ", 1)[1].split(" [type=value_error")[0]  # pydantic wraps it
    assert "\n" not in ours


def test_an_unsupported_architecture_is_refused(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=512, n_embd=128, n_layer=1, n_head=2, n_positions=512)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(require_shared(STORIES)).save_pretrained(tmp_path)
    (tmp_path / "segmask.json").write_text(
        json.dumps({"policy": "mas", "base_model": "gpt2", "adapter": False})
    )
    with pytest.raises(Exception, match="GPT2LMHeadModel, which the segmask plugin does not support"):
        LLM(str(tmp_path), **ENGINE)


def test_a_moved_vllm_internal_is_named(monkeypatch):
    from vllm.config import SchedulerConfig

    from segmask.integrations.vllm.plugin import VllmChangedError, check_internals

    check_internals()  # everything the plugin uses is where it expects it
    monkeypatch.delattr(SchedulerConfig, "enable_chunked_prefill", raising=False)
    monkeypatch.setattr(SchedulerConfig, "__dataclass_fields__", {})
    with pytest.raises(
        VllmChangedError, match=r"vllm 0\.32.*SchedulerConfig has no enable_chunked_prefill.*VLLM_PLUGINS=''"
    ):
        check_internals()


def test_the_way_out_that_a_moved_vllm_error_names_leaves_segmask_unloaded():
    # VllmChangedError (above) tells a user who must serve other models meanwhile to set VLLM_PLUGINS;
    # check that vLLM then skips the segmask plugin (its config hook not installed), and loads it otherwise
    probe = (
        "from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "from vllm.model_executor.models import config; print(type(config.MODELS_CONFIG_MAP).__name__)"
    )
    loaded = {}
    for allowlist in (None, ""):
        env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
        if allowlist is not None:
            env["VLLM_PLUGINS"] = allowlist
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        loaded[allowlist] = done.stdout.split()[-1]
    assert loaded == {None: "CheckedConfigs", "": "dict"}
