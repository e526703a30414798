"""Streamed text joins to the whole decode, for byte-fallback tokenizers writing emoji, CJK and invalid bytes.

stories260K's tokenizer is a sentencepiece model with 256 byte-fallback tokens (``<0x00>``..``<0xFF>``):
``'猫'`` is three of them. Llama 3.2's is byte-level BPE (no byte tokens) and stands as the control.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segmask.detokenize import TextStream, byte_token_ids
from segmask.generation import _Streamer

TEXTS = ["Look 😀 at the 猫 now", "猫猫😀😀 end", "é ñ 日本語 🙂👍🏽\nok", "a 猫猫 b"]


def streamed(tokenizer, tokens: list[int], hold: int = 0) -> list[str]:
    stream = TextStream(tokenizer, hold=hold)
    pieces = [stream.push(token) for token in tokens]
    return [*pieces, stream.flush()]


def test_byte_tokens_of_a_sentencepiece_tokenizer(stories_tokenizer, llama3_tokenizer):
    ids = byte_token_ids(stories_tokenizer)
    assert len(ids) == 256 and stories_tokenizer.convert_ids_to_tokens(min(ids)) == "<0x00>"
    assert byte_token_ids(stories_tokenizer) is ids  # read once per tokenizer
    assert byte_token_ids(llama3_tokenizer) == frozenset()


@pytest.mark.parametrize("text", TEXTS)
def test_emoji_and_cjk_arrive_whole(stories_tokenizer, text):
    tokens = stories_tokenizer(text, add_special_tokens=False).input_ids
    pieces = streamed(stories_tokenizer, tokens)
    assert "".join(pieces) == stories_tokenizer.decode(tokens) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_an_invalid_byte_spoils_its_whole_run_and_nothing_was_sent_before(stories_tokenizer):
    """'猫' then <0xFF> decodes as four U+FFFDs: the completed '猫' must not have been sent on its own."""
    cat = stories_tokenizer("猫", add_special_tokens=False).input_ids[-3:]
    ff = stories_tokenizer.convert_tokens_to_ids("<0xFF>")
    a = stories_tokenizer(" a", add_special_tokens=False).input_ids
    tokens = [*cat, ff, *a]
    pieces = streamed(stories_tokenizer, tokens)
    assert "".join(pieces) == stories_tokenizer.decode(tokens, skip_special_tokens=True)
    assert pieces[:4] == ["", "", "", ""]  # held through the run


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_pieces_join_to_the_whole_decode(stories_tokenizer, data):
    """Any token sequence: bytes, pieces, BOS/EOS in between; with or without held characters."""
    vocab = stories_tokenizer.vocab_size
    tokens = data.draw(st.lists(st.integers(0, vocab - 1), max_size=14))
    hold = data.draw(st.integers(0, 3))
    whole = stories_tokenizer.decode(tokens, skip_special_tokens=True)
    assert "".join(streamed(stories_tokenizer, tokens, hold)) == whole


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 511), max_size=12))
def test_generations_streamer_joins_to_the_whole_decode(stories_tokenizer, tokens):
    """segmask.generation.stream's streamer, fed as generate feeds it (the prompt first, then each token)."""
    streamer = _Streamer(stories_tokenizer)
    streamer.put(torch.tensor([[1, 5, 6]]))  # the prompt: skipped
    for token in tokens:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(streamer) == stories_tokenizer.decode(tokens, skip_special_tokens=True)


def test_the_old_streamer_broke_on_invalid_bytes(stories_tokenizer):
    """Why the streamer is ours: transformers' TextIteratorStreamer sends 'L' before <0x8D> spoils it."""
    from transformers import TextIteratorStreamer

    old = TextIteratorStreamer(stories_tokenizer, skip_prompt=True, skip_special_tokens=True)
    new = _Streamer(stories_tokenizer)
    for streamer in (old, new):
        streamer.put(torch.tensor([[1]]))
        for token in (79, 144):
            streamer.put(torch.tensor([token]))
        streamer.end()
    assert "".join(old) != stories_tokenizer.decode([79, 144]) == "".join(new)
