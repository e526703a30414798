"""The segment-level prefix cache: whole-segment cuts, exact reuse (logits and greedy tokens equal a full
prefill), back-off where a segment would continue, LRU under a byte cap, left-padded stacking, and the
old import path."""

from __future__ import annotations

import pytest
import torch

from segmask.generation import decode, generate, left_pad, prefill, prefill_for_decoding
from segmask.segments import encode_chat
from segmask.serving.prefix_cache import PrefixCache, cache_nbytes, stack_left_padded

pytestmark = pytest.mark.exactness

SYSTEM = {"role": "system", "content": "You tell short stories."}
CAT = [SYSTEM, {"role": "user", "content": "Tell me about a cat."}]
DOG = [SYSTEM, {"role": "user", "content": "Tell me about a dog."}]
CAT_AND_MORE = [SYSTEM, {"role": "user", "content": "Tell me about a cat. And a dog."}]


def encode(tokenizer, messages, policy="mas", causal_sink=False):
    encoded = encode_chat(
        tokenizer, messages, policy=policy, add_generation_prompt=True, causal_sink=causal_sink
    )
    return encoded.input_ids, encoded.segment_ids


def prompt_cache(model, ids, segments):
    """The one-row cache of all prompt tokens but the last, as the server stores it."""
    return prefill_for_decoding(model, torch.tensor([ids]), torch.tensor([segments]))


def assert_rest_prefill_is_exact(model, ids, segments, hit) -> None:
    """Prefilling the tokens after ``hit`` on its cache gives a full prefill's logits and K/V."""
    full_logits, full_cache = prefill(model, torch.tensor([ids]), torch.tensor([segments]))
    rest_logits, rest_cache = prefill(
        model, torch.tensor([ids[hit.length :]]), torch.tensor([segments[hit.length :]]), None, hit.cache
    )
    # float32 rounding only: the segment-blocked kernel sums the softmax in another order than one full call
    torch.testing.assert_close(rest_logits, full_logits[:, hit.length :], atol=5e-5, rtol=1e-4)
    for (keys, values, _), (ref_keys, ref_values, _) in zip(rest_cache, full_cache):
        torch.testing.assert_close(keys, ref_keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)


def test_reuse_of_the_system_segment_is_exact(model, tokenizer):
    store = PrefixCache(model.config, max_bytes=1 << 30)
    cat_ids, cat_segments = encode(tokenizer, CAT)
    assert store.lookup(cat_ids, cat_segments) is None
    stored = store.store(cat_ids, cat_segments, prompt_cache(model, cat_ids, cat_segments))
    assert stored == len(cat_ids) - 1  # whole segments up to the (causal) assistant header's last token

    ids, segments = encode(tokenizer, DOG)
    hit = store.lookup(ids, segments)
    system_length = segments.index(1)
    assert hit is not None and hit.length == system_length == cat_segments.index(1)
    assert hit.cache.get_seq_length() == system_length

    assert_rest_prefill_is_exact(model, ids, segments, hit)

    # greedy decoding from the reused cache gives generate's tokens
    cache = prefill_for_decoding(
        model,
        torch.tensor([ids[hit.length :]]),
        torch.tensor([segments[hit.length :]]),
        None,
        store.lookup(ids, segments).cache,
    )
    ids_tensor = torch.tensor([ids])
    output = decode(model, ids_tensor, torch.ones_like(ids_tensor), cache, max_new_tokens=12, do_sample=False)
    [reference] = generate(model, tokenizer, DOG, policy="mas", max_new_tokens=12, do_sample=False)
    assert output[0, len(ids) :].tolist()[: len(reference.token_ids)] == reference.token_ids


def test_reuse_after_a_causal_sink_is_exact(model, tokenizer):
    """With causal_sink the reusable prefix is the sink and the whole system segment after it (issue 20)."""
    store = PrefixCache(model.config, max_bytes=1 << 30)
    cat_ids, cat_segments = encode(tokenizer, CAT, causal_sink=True)
    store.store(cat_ids, cat_segments, prompt_cache(model, cat_ids, cat_segments))
    ids, segments = encode(tokenizer, DOG, causal_sink=True)
    assert segments[:2] == [-1, 0]
    hit = store.lookup(ids, segments)
    assert hit is not None and hit.length == segments.index(1) > 1
    assert store.lookup(*encode(tokenizer, DOG)) is None  # the same tokens without the sink: another key
    assert_rest_prefill_is_exact(model, ids, segments, hit)


def test_lookup_backs_off_where_a_segment_continues(model, tokenizer):
    store = PrefixCache(model.config, max_bytes=1 << 30)
    cat_ids, cat_segments = encode(tokenizer, CAT)
    store.store(cat_ids, cat_segments, prompt_cache(model, cat_ids, cat_segments))
    ids, segments = encode(tokenizer, CAT_AND_MORE)
    common = next(i for i, (a, b) in enumerate(zip(cat_ids, ids)) if a != b)
    system_length = segments.index(1)
    assert common > system_length + 3  # the token ids agree well into the user turn
    hit = store.lookup(ids, segments)
    assert hit is not None and hit.length == system_length

    # reusing the longer token match would be wrong: the cached user tokens never saw the rest of their turn
    _, naive = prefill(model, torch.tensor([cat_ids[:common]]), torch.tensor([cat_segments[:common]]))
    full_logits, _ = prefill(model, torch.tensor([ids]), torch.tensor([segments]))
    rest = torch.tensor([ids[common:]])
    naive_logits, _ = prefill(model, rest, torch.tensor([segments[common:]]), None, naive)
    assert not torch.allclose(naive_logits, full_logits[:, common:], atol=1e-3)


def test_segmentation_is_part_of_the_key_and_the_last_token_is_never_cached(model, tokenizer):
    store = PrefixCache(model.config, max_bytes=1 << 30)
    ids, segments = encode(tokenizer, CAT)
    store.store(ids, segments, prompt_cache(model, ids, segments))
    causal_ids, causal_segments = encode(tokenizer, CAT, policy="causal")
    assert causal_ids == ids
    assert store.lookup(causal_ids, causal_segments) is None  # same tokens, other mask: other K/V
    hit = store.lookup(ids, segments)  # the very same prompt
    assert hit is not None and hit.length == len(ids) - 1
    assert (store.hits, store.lookups) == (1, 2)


def test_prefix_policy_prompts_share_nothing(model, tokenizer):
    store = PrefixCache(model.config, max_bytes=1 << 30)
    ids, segments = encode(tokenizer, CAT, policy="prefix")
    assert store.store(ids, segments, prompt_cache(model, ids, segments)) == len(ids) - 1
    dog_ids, dog_segments = encode(tokenizer, DOG, policy="prefix")
    assert store.lookup(dog_ids, dog_segments) is None  # the one prompt segment differs


def test_lru_eviction_under_the_byte_cap_and_entries_that_extend_others(model, tokenizer):
    prompts = [
        [SYSTEM, {"role": "user", "content": f"Tell me about {animal}."}]
        for animal in ("a cat", "a dog", "Sam")
    ]
    encoded = [encode(tokenizer, p) for p in prompts]
    caches = [prompt_cache(model, ids, segments) for ids, segments in encoded]
    sizes = []
    for (ids, segments), cache in zip(encoded, caches):
        probe = PrefixCache(model.config, max_bytes=1 << 30)
        probe.store(ids, segments, cache)
        sizes.append(probe.nbytes)
    assert sizes[0] == cache_nbytes(caches[0]) and all(size > 0 for size in sizes)

    store = PrefixCache(model.config, max_bytes=sizes[0] + sizes[1] + sizes[2] - 1)
    store.store(*encoded[0], caches[0])
    store.store(*encoded[1], caches[1])
    assert store.lookup(*encoded[0]).length == len(encoded[0][0]) - 1  # touch entry 0: entry 1 is now oldest
    store.store(*encoded[2], caches[2])
    assert len(store) == 2 and store.nbytes == sizes[0] + sizes[2]
    assert store.lookup(*encoded[1]).length == encoded[1][1].index(1)  # only the shared system prompt is left

    # an entry that the stored one extends is not stored again, and a longer one replaces shorter ones
    system_only = PrefixCache(model.config, max_bytes=1 << 30)
    system_ids, system_segments = encode(tokenizer, [SYSTEM, {"role": "user", "content": "Hi."}])
    system_only.store(*encoded[0], caches[0])
    cut = system_segments.index(1)
    _, short_cache = prefill(model, torch.tensor([system_ids[:cut]]), torch.tensor([system_segments[:cut]]))
    assert system_only.store(system_ids[:cut], system_segments[:cut], short_cache) == cut
    assert len(system_only) == 1

    small = PrefixCache(model.config, max_bytes=sizes[0] - 1)
    small.store(*encoded[0], caches[0])
    assert len(small) == 0 and small.nbytes == 0
    off = PrefixCache(model.config, max_bytes=0)
    assert off.store(*encoded[0], caches[0]) == 0


def test_stacked_left_padded_rows_decode_like_each_row_alone(model, tokenizer):
    prompts = [CAT, [{"role": "user", "content": "Lily had a red ball and a big blue hat."}]]
    encoded = [encode_chat(tokenizer, p, policy="mas", add_generation_prompt=True) for p in prompts]
    rows = [prompt_cache(model, e.input_ids, e.segment_ids) for e in encoded]
    assert rows[0].get_seq_length() != rows[1].get_seq_length()
    cache = stack_left_padded(rows, model.config)
    batch = left_pad(encoded, 0)
    assert cache.get_seq_length() == batch["input_ids"].shape[1] - 1
    output = decode(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        cache,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
    )
    alone = generate(model, tokenizer, prompts, policy="mas", max_new_tokens=10, do_sample=False)
    width = batch["input_ids"].shape[1]
    for row, reference in zip(output, alone):
        assert row[width:].tolist()[: len(reference.token_ids)] == reference.token_ids


def test_stacking_a_row_with_nothing_cached(model):
    """A one-token causal prompt leaves its cache empty (generate runs the token): a zero row."""
    full = prompt_cache(model, [1, 403, 407, 261], [0, 0, 0, -1])
    empty = prompt_cache(model, [1], [-1])
    assert empty.get_seq_length() == 0
    stacked = stack_left_padded([empty, full], model.config)
    for (keys, values, _), (ref_keys, ref_values, _) in zip(stacked, full):
        assert keys.shape == (2, *ref_keys.shape[1:])
        assert torch.equal(keys[1:], ref_keys) and torch.equal(values[1:], ref_values)
        assert not keys[0].any() and not values[0].any()
    assert stack_left_padded([empty, empty], model.config).get_seq_length() == 0
