"""`segmask.turns`: each character of a chat template's rendering, then each token, gets its turn and kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from segmask import segments
from segmask.turns import CONTENT, END, HEADER, chat_layout, token_layout

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"


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


CHAT = [
    {"role": "user", "content": "Hi the"},
    {"role": "assistant", "content": "re you go"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "Bye"},
]


def test_a_template_that_renders_turns_out_of_order_is_refused(stories_tokenizer):
    reverse = "{% for m in messages|reverse %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
    with pytest.raises(ValueError, match="renders message 2 after message 3: turns out of order"):
        chat_layout(stories_tokenizer, CHAT, add_generation_prompt=False, chat_template=reverse)
    with pytest.raises(
        ValueError, match="turns out of order"
    ):  # the answer would be labelled before its prompt
        segments.encode_chat(stories_tokenizer, CHAT, chat_template=reverse)
    twice = "{{ messages[0].content }}\n" + reverse.replace("|reverse", "")
    with pytest.raises(ValueError, match="renders message 0 after message 0: turns out of order"):
        chat_layout(stories_tokenizer, CHAT, add_generation_prompt=False, chat_template=twice)


def test_a_token_across_a_prompt_and_its_labelled_answer_is_refused(stories_tokenizer):
    bare = "{% for m in messages %}{{ m.content }}{% endfor %}"  # "Hi there you go...": " there" spans both
    with pytest.raises(
        ValueError, match=r"the token ' there' \(characters 2..7\) spans prompt turn 0 and labelled"
    ):
        segments.encode_chat(stories_tokenizer, CHAT, chat_template=bare)
    # the same text with the first answer unlabelled (train_on="last") has no such token: it encodes
    encoded = segments.encode_chat(stories_tokenizer, CHAT, chat_template=bare, train_on="last")
    assert stories_tokenizer.decode([t for t in encoded.labels if t != segments.IGNORE_INDEX]) == "Bye"


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.jinja")), ids=lambda path: path.stem)
def test_every_fixture_template_still_encodes(stories_tokenizer, path):
    template = path.read_text(encoding="utf-8")
    encoded = segments.encode_chat(stories_tokenizer, CHAT, chat_template=template)
    labelled = stories_tokenizer.decode([t for t in encoded.labels if t != segments.IGNORE_INDEX])
    assert "re you go" in labelled and "Bye" in labelled and "Thanks" not in labelled
