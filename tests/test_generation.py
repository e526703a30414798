"""Generation with MAS prefill: exact against plain `generate` (causal) and against a naive MAS forward per
token; batched equals unbatched; beam search from a prefilled cache; chat sessions that reuse their KV
cache equal a full re-prefill; streaming."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import segmask
from segmask import generation
from segmask.generation import (
    ChatSession,
    encode_prompt,
    generate,
    generate_ids,
    prefill,
    reusable_prefix,
    stream,
)
from segmask.segments import encode_chat

pytestmark = pytest.mark.exactness

CHAT = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Tell me about a cat."},
]
OTHER_CHAT = [{"role": "user", "content": "Lily had a red ball."}]
STORY = "Once upon a time, there was a little dog named"
TINY = dict(vocab_size=512, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def tokenizer(stories_tokenizer):
    return stories_tokenizer


@pytest.fixture(scope="module")
def stories(stories_path):
    return segmask.enable(AutoModelForCausalLM.from_pretrained(stories_path).eval())


def tiny(family: str) -> torch.nn.Module:
    """A tiny random model sharing the stories tokenizer's vocabulary (Mistral: a sliding window of 5)."""
    torch.manual_seed(0)
    layers = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **TINY)
    if family == "qwen2":
        config = transformers.Qwen2Config(num_key_value_heads=2, **layers)
    elif family == "mistral":
        config = transformers.MistralConfig(num_key_value_heads=2, sliding_window=5, **layers)
    else:
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **TINY)
    return segmask.enable(AutoModelForCausalLM.from_config(config).eval())


@pytest.fixture(scope="module", params=["stories", "qwen2", "gpt2", "mistral"])
def model(request, stories):
    return stories if request.param == "stories" else tiny(request.param)


def naive_greedy(model, encoded, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy decoding by re-running the full MAS forward (prompt segmented, new tokens causal) per token."""
    ids, segments = list(encoded.input_ids), list(encoded.segment_ids)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids]), segment_ids=torch.tensor([segments])).logits
            token = int(logits[0, -1].argmax())
            new.append(token)
            ids.append(token)
            segments.append(-1)
            if token in eos:
                break
    return new


def full_prefill(model, tokenizer, messages, policy):
    """Logits and KV cache of the whole conversation prefilled from scratch."""
    encoded = encode_chat(tokenizer, messages, policy=policy, add_generation_prompt=True)
    return prefill(model, torch.tensor([encoded.input_ids]), torch.tensor([encoded.segment_ids])), encoded


def assert_caches_close(cache, reference, length: int) -> None:
    for layer, expected in zip(cache.layers, reference.layers):
        torch.testing.assert_close(
            layer.keys[..., :length, :], expected.keys[..., :length, :], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            layer.values[..., :length, :], expected.values[..., :length, :], atol=1e-5, rtol=1e-5
        )


# ------------------------------------------------------------------------------------ exact decoding


def test_causal_policy_equals_plain_generate_greedy_and_beam(model, tokenizer):
    prompts = [CHAT, STORY, OTHER_CHAT]
    batch = generation.left_pad([encode_prompt(tokenizer, p, "causal") for p in prompts], 0)
    assert (batch["segment_ids"] == -1).all()
    for options in (
        dict(do_sample=False, max_new_tokens=8),
        dict(do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=4),
    ):
        plain = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pad_token_id=0, **options
        )
        ours = generate_ids(model, **batch, pad_token_id=0, **options)
        assert torch.equal(ours, plain), options


def test_mas_greedy_equals_naive_full_forward(model, tokenizer):
    eos = {tokenizer.eos_token_id}
    # the chat ends in the causal assistant header; the raw story is one segment, so it ends bidirectionally
    for prompt in (CHAT, STORY):
        encoded = encode_prompt(tokenizer, prompt, "mas")
        [result] = generate(model, tokenizer, prompt, policy="mas", do_sample=False, max_new_tokens=10)
        assert result.token_ids == naive_greedy(model, encoded, 10, eos)
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert encode_prompt(tokenizer, STORY, "mas").segment_ids[-1] == 0
    assert encode_prompt(tokenizer, CHAT, "mas").segment_ids[-1] == -1


def test_mas_changes_the_output_of_a_real_model(stories, tokenizer):
    """Guard against a silently causal pipeline: MAS prefill must change the prompt's continuation."""
    causal = generate(stories, tokenizer, STORY, policy="causal", do_sample=False, max_new_tokens=10)
    mas = generate(stories, tokenizer, STORY, policy="mas", do_sample=False, max_new_tokens=10)
    assert causal[0].token_ids != mas[0].token_ids


def test_attention_backends_generate_the_same_tokens(stories, stories_path, tokenizer):
    from segmask.loading import load_model

    prompts = [CHAT, STORY]
    expected = generate(stories, tokenizer, prompts, policy="mas", do_sample=False, max_new_tokens=8)
    for implementation in ("eager", "segmask"):
        model, _, _ = load_model(stories_path, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        assert (
            generate(model, tokenizer, prompts, policy="mas", do_sample=False, max_new_tokens=8) == expected
        )


def test_batched_equals_unbatched(stories, tokenizer):
    # chats end causally, the raw story bidirectionally: the batch takes the prefill-and-crop path
    prompts = [CHAT, STORY, OTHER_CHAT, {"instruction": "Name a color.", "input": ""}]
    together = generate(stories, tokenizer, prompts, policy="mas", do_sample=False, max_new_tokens=6)
    alone = [
        generate(stories, tokenizer, p, policy="mas", do_sample=False, max_new_tokens=6)[0] for p in prompts
    ]
    assert together == alone


def test_beam_search_scores_equal_naive_mas_log_probs(stories, tokenizer):
    encoded = encode_prompt(tokenizer, CHAT, "mas")
    input_ids, segment_ids = torch.tensor([encoded.input_ids]), torch.tensor([encoded.segment_ids])
    output = generate_ids(
        stories,
        input_ids,
        segment_ids,
        num_beams=4,
        num_return_sequences=3,
        max_new_tokens=5,
        do_sample=False,
        length_penalty=0.0,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=0,
    )
    assert output.sequences.shape[0] == 3
    with torch.no_grad():
        for sequence, score in zip(output.sequences, output.sequences_scores):
            new = sequence[input_ids.shape[1] :].tolist()
            if 2 in new:
                new = new[: new.index(2) + 1]
            segments = encoded.segment_ids + [-1] * len(new)
            full = torch.tensor([encoded.input_ids + new])
            log_probs = stories(full, segment_ids=torch.tensor([segments])).logits.log_softmax(-1)
            positions = torch.arange(input_ids.shape[1] - 1, full.shape[1] - 1)
            expected = log_probs[0, positions, full[0, positions + 1]].sum()
            torch.testing.assert_close(score, expected, atol=1e-4, rtol=1e-4)


def test_sampling_with_a_seed_is_reproducible(stories, tokenizer):
    options = dict(policy="mas", do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=8)
    torch.manual_seed(1)
    first = generate(stories, tokenizer, [CHAT, STORY], **options)
    torch.manual_seed(1)
    assert generate(stories, tokenizer, [CHAT, STORY], **options) == first


def test_stopping_criteria_and_single_token_prompt(stories, tokenizer):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length + 3, dtype=torch.bool)

    encoded = encode_prompt(tokenizer, STORY, "mas")
    stop = AfterThree()
    stop.length = len(encoded.input_ids)
    [result] = generate(
        stories,
        tokenizer,
        STORY,
        policy="mas",
        max_new_tokens=20,
        stopping_criteria=StoppingCriteriaList([stop]),
    )
    assert len(result.token_ids) == 3
    # a prompt of one token (BOS only): nothing to prefill, generate runs it
    one = generate_ids(stories, torch.tensor([[1]]), torch.tensor([[0]]), max_new_tokens=5, do_sample=False)
    plain = stories.generate(torch.tensor([[1]]), max_new_tokens=5, do_sample=False)
    assert torch.equal(one, plain)


# ------------------------------------------------------------------------------------ prefill & cache


def test_decode_refuses_a_cache_holding_the_whole_prompt(stories):
    ids = torch.tensor([[1, 403, 407, 261]])
    _, cache = prefill(stories, ids, torch.zeros_like(ids))
    with pytest.raises(ValueError, match="all prompt tokens but the last"):
        generation.decode(stories, ids, torch.ones_like(ids), cache, max_new_tokens=2)


def test_new_turn_prefilled_against_cache_equals_full_prefill(stories, tokenizer):
    history = CHAT + [{"role": "assistant", "content": "Tom was a big cat."}]
    conversation = history + [{"role": "user", "content": "What did Tom eat?"}]
    (logits, cache), encoded = full_prefill(stories, tokenizer, conversation, "mas")
    first = encode_chat(tokenizer, history + [{"role": "user", "content": "x"}], policy="mas")
    cut = reusable_prefix(first.input_ids, first.segment_ids, encoded.input_ids, encoded.segment_ids)
    assert 0 < cut < len(encoded.input_ids) and encoded.segment_ids[cut - 1] == -1
    ids, segments = torch.tensor([encoded.input_ids]), torch.tensor([encoded.segment_ids])
    _, partial = prefill(stories, ids[:, :cut], segments[:, :cut])
    new_logits, partial = prefill(stories, ids[:, cut:], segments[:, cut:], cache=partial)
    torch.testing.assert_close(new_logits, logits[:, cut:], atol=1e-5, rtol=1e-5)
    assert_caches_close(partial, cache, len(encoded.input_ids))


def test_prefill_logits_to_keep_returns_the_last_logits(stories, tokenizer):
    (logits, _), encoded = full_prefill(stories, tokenizer, CHAT, "mas")
    ids, segments = torch.tensor([encoded.input_ids]), torch.tensor([encoded.segment_ids])
    last, cache = prefill(stories, ids, segments, logits_to_keep=1)
    assert last.shape == (1, 1, logits.shape[-1]) and cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(last, logits[:, -1:], atol=1e-5, rtol=1e-5)


def test_reusable_prefix_stops_at_changes_and_segments_that_span_the_cut():
    # same tokens and segments, new tokens follow in a new segment: everything is reusable
    assert reusable_prefix([5, 6, 7], [0, 0, -1], [5, 6, 7, 8, 9], [0, 0, -1, 1, -1]) == 3
    # a token differs
    assert reusable_prefix([5, 6, 7], [0, 0, -1], [5, 6, 9, 8], [0, 0, -1, 1]) == 2
    # the segment of the cached tokens continues in the new sequence: cut back to its start
    assert reusable_prefix([5, 6, 7, 8], [-1, 0, 0, -1], [5, 6, 7, 9], [-1, 0, 0, 0]) == 1
    # ... or continued in the cached sequence beyond the match
    assert reusable_prefix([5, 6, 7, 8], [-1, 0, 0, 0], [5, 6, 7, 9], [-1, 0, 0, -1]) == 1
    # segment ids differ (policy changed)
    assert reusable_prefix([5, 6, 7], [0, 0, -1], [5, 6, 7], [-1, -1, -1]) == 0
    # a segment id that comes back later (prefix policy): the whole segment is recomputed
    assert reusable_prefix([5, 6, 7], [0, 0, -1], [5, 6, 7, 8], [0, 0, 0, -1]) == 0


def test_chat_session_reuses_cache_and_equals_full_reprefill(stories, tokenizer):
    session = ChatSession(stories, tokenizer, policy="mas", system=CHAT[0]["content"], max_new_tokens=8)
    users = ["Tell me about a cat.", "What was its name?", "Where did it live?"]
    for turn, user in enumerate(users):
        before = session.messages + [{"role": "user", "content": user}]
        expected = generate(stories, tokenizer, [before], policy="mas", max_new_tokens=8)[0]
        reply = session.send(user)
        assert reply == expected.text
        (_, reference), encoded = full_prefill(stories, tokenizer, before, "mas")
        assert session.cached_tokens >= len(encoded.input_ids) - 1
        assert_caches_close(session._cache, reference, len(encoded.input_ids) - 1)
        if turn:  # only the new turn (with the previous answer's end-of-turn) was prefilled
            assert session.last_turn.reused > session.last_turn.prefilled > 0
            last_user = encode_chat(
                tokenizer, [{"role": "user", "content": user}], policy="mas", add_generation_prompt=True
            )
            assert session.last_turn.prefilled <= len(last_user.input_ids) + 4
    assert [m["role"] for m in session.messages] == ["system"] + ["user", "assistant"] * 3


def test_chat_session_on_a_sliding_window_model(tokenizer):
    """Prompts longer than the window: a cache that cannot be cropped back is re-prefilled, still exact."""
    mistral = tiny("mistral")
    session = ChatSession(mistral, tokenizer, system="Be kind.", max_new_tokens=5)
    for user in ("Tell me about a cat.", "And then?"):
        expected = generate(
            mistral, tokenizer, [session.messages + [{"role": "user", "content": user}]], max_new_tokens=5
        )
        assert session.send(user) == expected[0].text


@pytest.mark.parametrize("policy", ["prefix", "causal"])
def test_chat_session_other_policies_and_policy_switch(stories, tokenizer, policy):
    session = ChatSession(stories, tokenizer, policy="mas", max_new_tokens=6)
    session.send("Tell me about a cat.")
    session.set_policy(policy)
    before = session.messages + [{"role": "user", "content": "And a dog?"}]
    expected = generate(stories, tokenizer, [before], policy=policy, max_new_tokens=6)[0]
    assert session.send("And a dog?") == expected.text
    assert session.last_turn.reused == 0  # the segmentation changed from the first token
    follow = session.messages + [{"role": "user", "content": "Why?"}]
    expected = generate(stories, tokenizer, [follow], policy=policy, max_new_tokens=6)[0]
    assert session.send("Why?") == expected.text
    # causal reuses the cache; prefix makes the whole prompt one segment, so it re-prefills everything
    assert (session.last_turn.reused > 0) == (policy == "causal")


def test_chat_session_with_beam_search(stories, tokenizer):
    session = ChatSession(stories, tokenizer, num_beams=2, max_new_tokens=4)
    for user in ("Hi", "Tell me more."):
        before = session.messages + [{"role": "user", "content": user}]
        expected = generate(stories, tokenizer, [before], num_beams=2, max_new_tokens=4)[0]
        assert session.send(user) == expected.text
    assert session.last_turn.reused == 0  # beams widen the cache, so it is not kept across turns


def test_chat_session_system_change_and_reset(stories, tokenizer):
    session = ChatSession(stories, tokenizer, max_new_tokens=4)
    session.send("Hi")
    session.system = "Be brief."
    expected = generate(
        stories, tokenizer, [session.messages + [{"role": "user", "content": "Hi"}]], max_new_tokens=4
    )
    assert session.send("Hi") == expected[0].text
    assert session.last_turn.reused == 0  # the system message opens the conversation
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}] and session.cached_tokens == 0


# ------------------------------------------------------------------------------------ streaming & errors


def test_stream_yields_the_generated_text(stories, tokenizer):
    pieces = list(stream(stories, tokenizer, CHAT, policy="mas", max_new_tokens=12))
    assert len(pieces) > 1
    assert "".join(pieces) == generate(stories, tokenizer, CHAT, policy="mas", max_new_tokens=12)[0].text
    streamed, sent = (ChatSession(stories, tokenizer, max_new_tokens=6) for _ in range(2))
    for user in ("Hi", "Tell me more."):
        assert "".join(streamed.stream(user)) == sent.send(user)
    assert streamed.messages == sent.messages and streamed.cached_tokens == sent.cached_tokens


def test_closing_a_stream_cancels_the_turn(stories, tokenizer):
    import threading

    threads = threading.active_count()
    session = ChatSession(stories, tokenizer, max_new_tokens=200)
    pieces = session.stream("Tell me about a cat.")
    next(pieces)
    pieces.close()
    assert threading.active_count() == threads  # the generation thread was stopped, not left running
    assert session.messages == [] and session.cached_tokens == 0
    session.generation_kwargs["max_new_tokens"] = 6
    expected = generate(stories, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=6)[0]
    assert session.send("Hi") == expected.text


def test_stream_reraises_errors_from_the_generation_thread(stories, tokenizer):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Broken(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            raise RuntimeError("broken criterion")

    pieces = stream(
        stories, tokenizer, STORY, max_new_tokens=4, stopping_criteria=StoppingCriteriaList([Broken()])
    )
    with pytest.raises(RuntimeError, match="broken criterion"):
        list(pieces)


def test_bad_inputs_are_refused_clearly(stories, tokenizer, stories_path):
    with pytest.raises(ValueError, match="left-padded"):
        generate_ids(stories, torch.tensor([[1, 5, 0]]), torch.tensor([[0, 0, 0]]), torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="a prompt must be"):
        generate(stories, tokenizer, [42])
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        generate(stories, tokenizer, [])
    with pytest.raises(ValueError, match="unknown mask policy"):
        generate(stories, tokenizer, STORY, policy="bidirectional")
    with pytest.raises(ValueError, match="chat template"):
        ChatSession(stories, AutoTokenizer.from_pretrained(stories_path))
