"""No segment ids reach a model that segmask did not enable: every entry point refuses, none runs causal.

transformers' forwards swallow unknown keyword arguments, so before these checks ``segmask.generate`` on a
model nobody enabled returned the causal text, and a plain ``Trainer`` with ``segmask.Collator`` trained
causally, both without a word.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import segmask
from segmask import guard
from segmask.chat import ChatSession
from segmask.generation import generate, prefill, stream
from segmask.hook import require_enabled
from segmask.leaks import leak_check
from segmask.scoring import continuation_logprobs
from segmask.segments import encode_chat

CONVERSATION = [
    {"role": "system", "content": "Tim has a dog."},
    {"role": "user", "content": "Who has a dog?"},
]


@pytest.fixture
def plain(stories_path):
    """stories260K as loaded, never passed to segmask.enable."""
    return AutoModelForCausalLM.from_pretrained(stories_path).eval()


def test_generate_refuses_a_model_that_was_not_enabled(plain, stories_tokenizer):
    with pytest.raises(guard.NotEnabledError, match=r"segmask\.enable\(model\)"):
        generate(plain, stories_tokenizer, CONVERSATION, policy="mas", max_new_tokens=4)
    with pytest.raises(guard.NotEnabledError):
        generate(plain, stories_tokenizer, CONVERSATION, policy="prefix", max_new_tokens=4)


def test_causal_policy_needs_no_hook(plain, stories_tokenizer, stories_model):
    """Every segment id -1 asks for the causal mask, which a plain model runs: same tokens as enabled."""
    ours = generate(plain, stories_tokenizer, CONVERSATION, policy="causal", max_new_tokens=6)
    enabled = generate(stories_model, stories_tokenizer, CONVERSATION, policy="causal", max_new_tokens=6)
    assert ours == enabled


def test_stream_refuses_a_model_that_was_not_enabled(plain, stories_tokenizer):
    with pytest.raises(guard.NotEnabledError):
        list(stream(plain, stories_tokenizer, CONVERSATION, policy="mas", max_new_tokens=4))


def test_chat_session_refuses_a_model_that_was_not_enabled(plain, stories_tokenizer):
    session = ChatSession(plain, stories_tokenizer, policy="mas", system="Tim has a dog.", max_new_tokens=4)
    with pytest.raises(guard.NotEnabledError):
        session.send("Who has a dog?")
    with pytest.raises(guard.NotEnabledError):
        list(session.stream("Who has a dog?"))
    assert session.turns == []


def test_prefill_scoring_and_leak_check_refuse_a_model_that_was_not_enabled(plain, stories_tokenizer):
    encoded = encode_chat(stories_tokenizer, CONVERSATION, policy="mas", add_generation_prompt=True)
    ids, segments = torch.tensor([encoded.input_ids]), torch.tensor([encoded.segment_ids])
    with pytest.raises(guard.NotEnabledError):
        prefill(plain, ids, segments)
    with pytest.raises(guard.NotEnabledError):
        continuation_logprobs(plain, encoded.input_ids, encoded.segment_ids, [[5, 6]])
    with pytest.raises(guard.NotEnabledError):
        leak_check(plain, encoded)
    with pytest.raises(guard.NotEnabledError):
        require_enabled(plain, None, document_ids=torch.zeros_like(ids))


def test_the_refusal_goes_away_once_enabled(plain, stories_tokenizer, stories_model):
    mas = generate(segmask.enable(plain), stories_tokenizer, CONVERSATION, policy="mas", max_new_tokens=6)
    assert mas == generate(stories_model, stories_tokenizer, CONVERSATION, policy="mas", max_new_tokens=6)


def tiny_llama(attn_implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)


def collated_batch() -> dict[str, torch.Tensor]:
    records = [
        {"input_ids": [1, 5, 6, 7, 8, 9], "segment_ids": [0, 0, 1, 1, -1, -1], "labels": [-100] * 4 + [8, 9]},
        {"input_ids": [1, 5, 9, 10], "segment_ids": [0, 0, -1, -1], "labels": [-100, -100, 9, 10]},
    ]
    return segmask.Collator(pad_token_id=0)(records)


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_a_collated_batch_on_a_model_that_was_not_enabled_raises_in_attention(implementation):
    batch = collated_batch()  # the Collator installs the guard
    model = tiny_llama(implementation)
    with pytest.raises(guard.NotEnabledError, match="LlamaAttention"):
        model(**batch)
    segmask.enable(model, fast=False)
    with torch.no_grad():  # FlexAttention has no backward on CPU
        assert torch.isfinite(model(**batch).loss)


def test_a_plain_trainer_with_the_collator_fails_loudly_without_enable(tmp_path):
    """The probe's case: transformers' Trainer, segmask.Collator, a model nobody enabled."""
    records = [
        {"input_ids": [1, 5, 6, 7, 8, 9], "segment_ids": [0, 0, 1, 1, -1, -1], "labels": [-100] * 4 + [8, 9]}
    ] * 4
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
        remove_unused_columns=False, use_cpu=True,
    )  # fmt: skip
    collator = segmask.Collator(pad_token_id=0)
    trainer = Trainer(model=tiny_llama("sdpa"), args=args, train_dataset=records, data_collator=collator)
    with pytest.raises(guard.NotEnabledError):
        trainer.train()
    enabled = segmask.enable(tiny_llama("sdpa"))
    trainer = Trainer(model=enabled, args=args, train_dataset=records, data_collator=collator)
    assert trainer.train().training_loss > 0


def test_the_segmask_implementation_without_a_layout_refuses_segment_ids():
    """A model set to attn_implementation="segmask" by hand but never enabled gets no layout: refuse."""
    from segmask import hook

    hook.register()
    model = tiny_llama("sdpa")
    model.set_attn_implementation(hook.IMPLEMENTATION)
    with pytest.raises(guard.NotEnabledError):
        model(**collated_batch())


def test_the_guard_wraps_what_transformers_registers():
    """Upstream guard: if transformers stops looking these names up in its registry, this fails."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    guard.install()
    guard.install()  # idempotent: one wrapper, not two
    for name in guard.GUARDED:
        function = ALL_ATTENTION_FUNCTIONS[name]
        assert function.segmask_guard and not getattr(function.__wrapped__, "segmask_guard", False)


def test_asks_for_mas():
    assert not guard.asks_for_mas(None)
    assert not guard.asks_for_mas(torch.tensor([[-1, -1]]))
    assert guard.asks_for_mas(torch.tensor([[0, -1]]))
    assert guard.asks_for_mas(torch.tensor([[-1, -1]]), torch.tensor([[0, 0]]))
