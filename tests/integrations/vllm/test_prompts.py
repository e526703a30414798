"""PromptSegmenter: segment ids from prompt token ids equal segmask.encode_chat's, on every chat template in
tests/fixtures (one turn, multi-turn, a system message, the sink on and off, prefix); the raw-text fallback,
logged once; preempted requests. Needs no vLLM (it also runs in the main environment)."""

from __future__ import annotations

import logging

import pytest
from conftest import STORIES, require_shared
from tiny_models import CONVERSATIONS, TEMPLATES

from segmask.integrations.vllm.prompts import PromptSegmenter, fit
from segmask.segments import encode_chat, encode_text

TEMPLATE_FILES = sorted(path.name for path in TEMPLATES.glob("*.jinja"))
# templates that fold the system message into the first user turn: "system S, user U" renders exactly as
# "user 'S\n\nU'", so the ids cannot tell them apart (the segmenter reads the latter)
FOLDED_SYSTEM = {"gemma3.jinja", "mistral_system.jinja"}
SETTINGS = [("mas", None), ("mas", False), ("prefix", None), ("prefix", True)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require_shared(STORIES))


def encodable(tokenizer, template: str) -> list[list[dict]]:
    """The test conversations the template accepts (gemma and mistral refuse a system message)."""
    kept = []
    for conversation in CONVERSATIONS:
        try:
            encode_chat(tokenizer, conversation, add_generation_prompt=True, chat_template=template)
        except ValueError:
            continue
        kept.append(conversation)
    return kept


@pytest.mark.parametrize("name", TEMPLATE_FILES)
@pytest.mark.parametrize(("policy", "sink"), SETTINGS)
def test_segments_equal_encode_chat(tokenizer, name, policy, sink):
    template = (TEMPLATES / name).read_text()
    segmenter = PromptSegmenter(tokenizer, policy, sink, template)
    conversations = encodable(tokenizer, template)
    assert len(conversations) >= 2  # one turn and at least one multi-turn conversation
    for conversation in conversations:
        if name in FOLDED_SYSTEM and conversation[0]["role"] == "system":
            continue  # test_a_folded_system_message_reads_as_the_first_user_turn
        encoded = encode_chat(tokenizer, conversation, policy, True, chat_template=template, causal_sink=sink)
        assert segmenter(encoded.input_ids) == encoded.segment_ids, conversation
        assert segmenter.conversation(encoded.input_ids) == conversation


@pytest.mark.parametrize("name", sorted(FOLDED_SYSTEM))
def test_a_folded_system_message_reads_as_the_first_user_turn(tokenizer, name):
    template = (TEMPLATES / name).read_text()
    system, user, *rest = CONVERSATIONS[1]
    merged = [{"role": "user", "content": system["content"] + "\n\n" + user["content"]}, *rest]
    with_system = encode_chat(tokenizer, CONVERSATIONS[1], "mas", True, chat_template=template)
    folded = encode_chat(tokenizer, merged, "mas", True, chat_template=template)
    assert with_system.input_ids == folded.input_ids
    assert PromptSegmenter(tokenizer, "mas", None, template)(with_system.input_ids) == folded.segment_ids


def test_a_default_system_prompt_stays_in_the_first_turn(tokenizer):
    """SmolLM2's template adds its system prompt when there is none; a client that sends no system message
    gets encode_chat's segments for no system message (the default text in the first user turn's header)."""
    template = (TEMPLATES / "chatml_smollm2.jinja").read_text()
    encoded = encode_chat(tokenizer, CONVERSATIONS[0], "mas", True, chat_template=template)
    assert sorted(set(encoded.segment_ids)) == [-1, 0]  # one prompt segment: the default system is no turn
    assert PromptSegmenter(tokenizer, "mas", None, template)(encoded.input_ids) == encoded.segment_ids


def test_raw_text_is_one_segment_logged_once(tokenizer, caplog):
    template = (TEMPLATES / "chatml_smollm2.jinja").read_text()
    segmenter = PromptSegmenter(tokenizer, "mas", None, template)
    raw = encode_text(tokenizer, "Once upon a time, there was a little girl", "mas")
    with caplog.at_level(logging.WARNING, logger="segmask.integrations.vllm.prompts"):
        assert segmenter(raw.input_ids) == raw.segment_ids == [-1] + [0] * (len(raw) - 1)
        assert segmenter(raw.input_ids[:5]) == [-1, 0, 0, 0, 0]
    assert len([r for r in caplog.records if "no chat" in r.getMessage()]) == 1


def test_a_tokenizer_without_template_makes_every_prompt_raw_text(tokenizer):
    template = (TEMPLATES / "chatml_smollm2.jinja").read_text()
    encoded = encode_chat(tokenizer, CONVERSATIONS[1], "mas", True, chat_template=template)
    assert PromptSegmenter(tokenizer, "prefix")(encoded.input_ids) == [0] * len(encoded)


def test_a_preempted_request_keeps_its_prompt_segments(tokenizer):
    """vLLM recomputes a preempted request as prompt + output: the prompt's segments, the output causal."""
    template = (TEMPLATES / "qwen2_5.jinja").read_text()
    segmenter = PromptSegmenter(tokenizer, "mas", None, template)
    encoded = encode_chat(tokenizer, CONVERSATIONS[2], "mas", True, chat_template=template)
    assert segmenter(encoded.input_ids) == encoded.segment_ids
    output = [300, 301, 302]
    assert segmenter(encoded.input_ids + output) == encoded.segment_ids + [-1, -1, -1]


def test_fit_takes_each_content_up_to_the_next_piece():
    pieces = ["<u>", "</u><a>", "</a><u>", "</u><a>"]
    assert fit("<u>hi</u><a>yo</a><u>ok</u><a>", pieces) == ["hi", "yo", "ok"]
    assert fit("<u>hi</u><a>", pieces) is None
    assert fit("<u>hi</u><a>yo</a><u>ok</u><b>", pieces) is None
