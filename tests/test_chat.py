"""Chat sessions that reuse their KV cache equal a full re-prefill, under every policy, with beams, a
sliding window and streaming; the reusable-prefix rule."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import CHAT, assert_caches_close, full_prefill, tiny
from transformers import AutoTokenizer

from segmask.chat import ChatSession
from segmask.generation import generate, prefill
from segmask.masks import reusable_prefix
from segmask.segments import encode_chat

pytestmark = pytest.mark.exactness


@pytest.mark.parametrize("sink", [None, False], ids=["default-sink", "paper-mask"])
def test_new_turn_prefilled_against_cache_equals_full_prefill(stories_model, stories_tokenizer, sink):
    history = CHAT + [{"role": "assistant", "content": "Tom was a big cat."}]
    conversation = history + [{"role": "user", "content": "What did Tom eat?"}]
    (logits, cache), encoded = full_prefill(
        stories_model, stories_tokenizer, conversation, "mas", causal_sink=sink
    )
    assert encoded.segment_ids[0] == (-1 if sink is None else 0)
    first = encode_chat(
        stories_tokenizer, history + [{"role": "user", "content": "x"}], policy="mas", causal_sink=sink
    )
    cut = reusable_prefix(first.input_ids, first.segment_ids, encoded.input_ids, encoded.segment_ids)
    assert 0 < cut < len(encoded.input_ids) and encoded.segment_ids[cut - 1] == -1
    ids, segments = torch.tensor([encoded.input_ids]), torch.tensor([encoded.segment_ids])
    _, partial = prefill(stories_model, ids[:, :cut], segments[:, :cut])
    new_logits, partial = prefill(stories_model, ids[:, cut:], segments[:, cut:], cache=partial)
    # float32 noise is ~1e-5 on these logits; a token seeing one it should not moves them by ~1
    torch.testing.assert_close(new_logits, logits[:, cut:], atol=1e-4, rtol=1e-4)
    assert_caches_close(partial, cache, len(encoded.input_ids))


def test_chat_session_reuses_cache_and_equals_full_reprefill(stories_model, stories_tokenizer):
    session = ChatSession(
        stories_model, stories_tokenizer, policy="mas", system=CHAT[0]["content"], max_new_tokens=8
    )
    users = ["Tell me about a cat.", "What was its name?", "Where did it live?"]
    for turn, user in enumerate(users):
        before = session.messages + [{"role": "user", "content": user}]
        expected = generate(stories_model, stories_tokenizer, [before], policy="mas", max_new_tokens=8)[0]
        reply = session.send(user)
        assert reply == expected.text
        (_, reference), encoded = full_prefill(stories_model, stories_tokenizer, before, "mas")
        assert session.cached_tokens >= len(encoded.input_ids) - 1
        assert_caches_close(session._cache, reference, len(encoded.input_ids) - 1)
        if turn:  # only the new turn (with the previous answer's end-of-turn) was prefilled
            assert session.last_turn.reused > session.last_turn.prefilled > 0
            last_user = encode_chat(
                stories_tokenizer,
                [{"role": "user", "content": user}],
                policy="mas",
                add_generation_prompt=True,
            )
            assert session.last_turn.prefilled <= len(last_user.input_ids) + 4
    assert [m["role"] for m in session.messages] == ["system"] + ["user", "assistant"] * 3


def test_chat_session_with_a_causal_sink_reuses_cache_and_equals_full_reprefill(
    stories_model, stories_tokenizer
):
    session = ChatSession(
        stories_model,
        stories_tokenizer,
        policy="mas",
        system=CHAT[0]["content"],
        causal_sink=True,
        max_new_tokens=6,
    )
    for turn, user in enumerate(["Tell me about a cat.", "What was its name?"]):
        before = session.messages + [{"role": "user", "content": user}]
        expected = generate(
            stories_model, stories_tokenizer, [before], policy="mas", causal_sink=True, max_new_tokens=6
        )[0]
        assert session.send(user) == expected.text
        encoded = encode_chat(
            stories_tokenizer, before, policy="mas", add_generation_prompt=True, causal_sink=True
        )
        assert encoded.segment_ids[:2] == [-1, 0]
        ids, segments = torch.tensor([encoded.input_ids]), torch.tensor([encoded.segment_ids])
        _, reference = prefill(stories_model, ids, segments)
        assert_caches_close(session._cache, reference, len(encoded.input_ids) - 1)
        if turn:
            assert session.last_turn.reused > session.last_turn.prefilled > 0


def test_chat_session_on_a_sliding_window_model(stories_tokenizer):
    """Prompts longer than the window: a cache that cannot be cropped back is re-prefilled, still exact."""
    mistral = tiny("mistral")
    session = ChatSession(mistral, stories_tokenizer, system="Be kind.", max_new_tokens=5)
    for user in ("Tell me about a cat.", "And then?"):
        expected = generate(
            mistral,
            stories_tokenizer,
            [session.messages + [{"role": "user", "content": user}]],
            max_new_tokens=5,
        )
        assert session.send(user) == expected[0].text


@pytest.mark.parametrize("policy", ["prefix", "causal"])
def test_chat_session_other_policies_and_policy_switch(stories_model, stories_tokenizer, policy):
    session = ChatSession(stories_model, stories_tokenizer, policy="mas", max_new_tokens=6)
    session.send("Tell me about a cat.")
    session.set_policy(policy)
    before = session.messages + [{"role": "user", "content": "And a dog?"}]
    expected = generate(stories_model, stories_tokenizer, [before], policy=policy, max_new_tokens=6)[0]
    assert session.send("And a dog?") == expected.text
    # the segmentation changed from token 1 on; token 0 (the BOS) is causal under mas's default sink and
    # under causal, so only then is it reused
    assert session.last_turn.reused == (1 if policy == "causal" else 0)
    follow = session.messages + [{"role": "user", "content": "Why?"}]
    expected = generate(stories_model, stories_tokenizer, [follow], policy=policy, max_new_tokens=6)[0]
    assert session.send("Why?") == expected.text
    # causal reuses the cache; prefix makes the whole prompt one segment, so it re-prefills everything
    assert (session.last_turn.reused > 0) == (policy == "causal")


def test_chat_session_with_beam_search(stories_model, stories_tokenizer):
    session = ChatSession(stories_model, stories_tokenizer, num_beams=2, max_new_tokens=4)
    for user in ("Hi", "Tell me more."):
        before = session.messages + [{"role": "user", "content": user}]
        expected = generate(stories_model, stories_tokenizer, [before], num_beams=2, max_new_tokens=4)[0]
        assert session.send(user) == expected.text
    assert session.last_turn.reused == 0  # beams widen the cache, so it is not kept across turns


def test_chat_session_system_change_and_reset(stories_model, stories_tokenizer):
    session = ChatSession(stories_model, stories_tokenizer, max_new_tokens=4)
    session.send("Hi")
    session.system = "Be brief."
    expected = generate(
        stories_model,
        stories_tokenizer,
        [session.messages + [{"role": "user", "content": "Hi"}]],
        max_new_tokens=4,
    )
    assert session.send("Hi") == expected[0].text
    assert session.last_turn.reused == 1  # the system message opens the conversation: only the BOS (the sink)
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}] and session.cached_tokens == 0


def test_chat_session_stream_equals_send(stories_model, stories_tokenizer):
    streamed, sent = (ChatSession(stories_model, stories_tokenizer, max_new_tokens=6) for _ in range(2))
    for user in ("Hi", "Tell me more."):
        assert "".join(streamed.stream(user)) == sent.send(user)
    assert streamed.messages == sent.messages and streamed.cached_tokens == sent.cached_tokens


def test_closing_a_stream_cancels_the_turn(stories_model, stories_tokenizer):
    threads = threading.active_count()
    session = ChatSession(stories_model, stories_tokenizer, max_new_tokens=200)
    pieces = session.stream("Tell me about a cat.")
    next(pieces)
    pieces.close()
    assert threading.active_count() == threads  # the generation thread was stopped, not left running
    assert session.messages == [] and session.cached_tokens == 0
    session.generation_kwargs["max_new_tokens"] = 6
    expected = generate(
        stories_model, stories_tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=6
    )[0]
    assert session.send("Hi") == expected.text


def test_chat_session_needs_a_chat_template(stories_model, stories_path):
    with pytest.raises(ValueError, match="chat template"):
        ChatSession(stories_model, AutoTokenizer.from_pretrained(stories_path))
