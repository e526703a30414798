"""`segmask.turns`: each character of a chat template's rendering, then each token, gets its turn and kind."""

from __future__ import annotations

import pytest

from segmask import segments, turns
from segmask.turns import CONTENT, END, HEADER, chat_layout, token_layout


def test_chat_layout_marks_headers_contents_and_ends(stories_tokenizer):
    """STORIES_CHAT_TEMPLATE: ``<|role|>\\n`` header, the content, ``</s>\\n`` end of turn."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    text, char_turns, kinds = chat_layout(stories_tokenizer, messages, add_generation_prompt=True)
    assert text == "<|user|>\nHi</s>\n<|assistant|>\nYo</s>\n<|assistant|>\n"
    spans = [(text[i], t, k) for i, (t, k) in enumerate(zip(char_turns, kinds))]
    assert [c for c, t, k in spans if k == CONTENT] == list("HiYo")
    assert [t for c, t, k in spans if k == CONTENT] == [0, 0, 1, 1]
    assert "".join(c for c, t, k in spans if t == 0 and k == END) == "</s>\n"
    assert "".join(c for c, t, k in spans if t == 2) == "<|assistant|>\n"  # the generation prompt
    assert {k for c, t, k in spans if t == 2} == {HEADER}


def test_token_layout_gives_each_token_its_last_characters_turn(stories_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    text, char_turns, kinds = chat_layout(stories_tokenizer, messages, add_generation_prompt=False)
    ids, token_turns, token_kinds = token_layout(
        stories_tokenizer, text, char_turns, kinds, add_special_tokens=False
    )
    assert ids == stories_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(token_turns) == len(token_kinds) == len(ids)
    assert token_turns == sorted(token_turns) and set(token_turns) == {0, 1}


def test_old_import_path_warns():
    with pytest.warns(DeprecationWarning, match="segmask.segments.chat_layout moved to segmask.turns"):
        assert segments.chat_layout is turns.chat_layout
