"""Where each turn of a conversation lies: per character of a chat template's rendering, then per token.

How turns are found, for any template and without knowing its family: the conversation is rendered once
as is and once with every message content replaced by a unique marker. The marked rendering shows where
each content sits and which template text lies between contents; the real rendering is aligned to it
(allowing for templates that trim contents). Template text before a content is that turn's header; the
text after it belongs to the same turn up to where a rendering of the conversation cut after that message
ends, the rest is the next turn's header. The cut rendering is made once per kind of turn end (the message
without its content, and the template text up to the next content): turns of one kind end alike, and a
rendering per message would make encoding quadratic in the conversation's length. A token takes the turn
of its last character (a token straddling two turns belongs to the later one). Text a template adds before
the first message (BOS, a default system prompt) belongs to the first message.

Two renderings are refused (``ValueError``), as no layout of them is right: a template that renders the
messages out of order (``messages|reverse``: an answer would be labelled before its prompt), and, given the
prompt and labelled turns, a token that holds characters of both (a template without separators between a
question and its answer: the label would cover prompt text).

:func:`chat_layout` gives the rendered text with each character's turn and kind (``HEADER``, ``CONTENT``,
``END``); :func:`token_layout` tokenizes a text once and gives each token the turn and kind of its last
character. :mod:`segmask.segments` turns those into segment ids and labels under a mask policy.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from jinja2 import TemplateError

# kinds of characters / tokens inside a turn
HEADER, CONTENT, END = 0, 1, 2
MARKER = re.compile("\ue000(\\d+)\ue001")


def render(
    tokenizer, messages: list[dict], generation_prompt: bool, template: str | None, kwargs: Mapping
) -> str:
    """The chat template's text for ``messages``; a template error becomes a ``ValueError``."""
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=template,
            **kwargs,
        )
    except TemplateError as error:
        raise ValueError(f"the chat template rejected the conversation: {error}") from None


def marker(index: int) -> str:
    """A private-use placeholder for message ``index``'s content, found again in the rendered text."""
    return f"\ue000{index}\ue001"


def _align(
    text: str, pieces: list[str], order: list[int], messages: list[dict]
) -> list[tuple[int, int]] | None:
    """Character spans in ``text`` of the contents that the marked rendering ``pieces`` shows.

    ``pieces`` is the marked rendering split at its markers (``len(order) + 1`` literal pieces); each
    marker stands for ``messages[order[j]]["content"]``, possibly trimmed by the template. None if the
    real rendering does not follow the marked one.
    """
    if not text.startswith(pieces[0]):
        return None
    spans = []
    position = len(pieces[0])
    for j, index in enumerate(order):
        after, last = pieces[j + 1], j + 1 == len(order)

        def fits(end: int, after: str = after, last: bool = last) -> bool:
            return text.startswith(after, end) and (not last or end + len(after) == len(text))

        content = messages[index]["content"]
        length = None
        for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if text.startswith(candidate, position) and fits(position + len(candidate)):
                length = len(candidate)
                break
        if length is None:  # the template changed the content otherwise: find the template text after it
            if last:
                end = len(text) - len(after)
                length = end - position if end >= position and text.endswith(after) else None
            elif after:
                end = text.find(after, position)
                length = end - position if end >= 0 else None
        if length is None:
            return None
        spans.append((position, position + length))
        position += length + len(after)
    return spans


def _turn_end(tokenizer, marked: list[dict], index: int, template: str | None, kwargs: Mapping) -> str:
    """Template text after message ``index`` when the conversation is cut right after it ("" if unknown)."""
    try:
        prefix = render(tokenizer, marked[: index + 1], False, template, kwargs)
    except ValueError:
        return ""
    found = list(MARKER.finditer(prefix))
    if not found or int(found[-1].group(1)) != index:
        return ""
    return prefix[found[-1].end() :]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_layout(
    tokenizer,
    messages: list[dict],
    add_generation_prompt: bool,
    chat_template: str | None = None,
    template_kwargs: Mapping | None = None,
) -> tuple[str, list[int], list[int]]:
    """The rendered text and, per character, its turn and kind (``HEADER``, ``CONTENT``, ``END``).

    Turns are message indices; the generation prompt is turn ``len(messages)``.
    """
    kwargs = dict(template_kwargs or {})
    text = render(tokenizer, messages, add_generation_prompt, chat_template, kwargs)
    generation = len(messages)
    everything = range(len(messages))
    nonempty = {i for i in everything if messages[i]["content"]}
    # Mark every content; if the template treats empty contents differently, leave those unmarked.
    for marked_indices in (everything, nonempty):
        marked = [
            {**message, "content": marker(i)} if i in marked_indices else message
            for i, message in enumerate(messages)
        ]
        parts = MARKER.split(render(tokenizer, marked, add_generation_prompt, chat_template, kwargs))
        pieces, order = parts[0::2], [int(i) for i in parts[1::2]]
        if not order and pieces[0] == text:  # no content rendered (say, a lone system prompt): all template
            plain = render(tokenizer, messages, False, chat_template, kwargs)
            split = len(plain) if add_generation_prompt and text.startswith(plain) else len(text)
            return text, [0] * split + [generation] * (len(text) - split), [HEADER] * len(text)
        spans = _align(text, pieces, order, messages) if order else None
        if spans is not None:
            break
    else:
        raise ValueError(
            "cannot locate the message contents in the chat template's output "
            "(the template changes them beyond trimming, or depends on them)"
        )
    for before, after in zip(order, order[1:]):
        if after <= before:  # a turn starts where the previous one ended, so contents come in message order
            raise ValueError(
                f"the chat template renders message {after} after message {before}: turns out of order "
                "(or one rendered twice); segmask needs each message rendered once, in the conversation's "
                "order"
            )
    turns, kinds = [order[0]] * len(text), [HEADER] * len(text)
    ends: dict[tuple, str] = {}  # one cut rendering per kind of turn end: linear in the conversation
    for j, (start, end) in enumerate(spans):
        index = order[j]
        turns[start:end], kinds[start:end] = [index] * (end - start), [CONTENT] * (end - start)
        gap = pieces[j + 1]
        shape = sorted((k, repr(v)) for k, v in messages[index].items() if k != "content")
        key = (tuple(shape), gap)
        if key not in ends:
            ends[key] = _turn_end(tokenizer, marked, index, chat_template, kwargs)
        own = _common_prefix(ends[key], gap)
        if j + 1 < len(order):
            following, following_kind = order[j + 1], HEADER
        elif add_generation_prompt:
            following, following_kind = generation, HEADER
        else:
            following, following_kind = index, END
        turns[end : end + own], kinds[end : end + own] = [index] * own, [END] * own
        rest = len(gap) - own
        turns[end + own : end + len(gap)] = [following] * rest
        kinds[end + own : end + len(gap)] = [following_kind] * rest
    return text, turns, kinds


def token_layout(
    tokenizer,
    text: str,
    turns: list[int],
    kinds: list[int],
    add_special_tokens: bool,
    *,
    prompt: Collection[int] = (),
    labelled: Collection[int] = (),
) -> tuple[list[int], list[int], list[int]]:
    """Tokenize ``text`` once; each token takes the turn and kind of its last character.

    Tokens without characters (a BOS or EOS the tokenizer adds) take those of their neighbour: the next
    token at the start, the previous one elsewhere. A token that would be labelled (its last character lies
    in a ``labelled`` turn, outside its header) but holds characters of a ``prompt`` turn is a
    ``ValueError``: the template puts no separator between them, and the label would cover prompt text.
    """
    if not getattr(tokenizer, "is_fast", True):
        raise ValueError("segmask needs a fast tokenizer (character offsets); load it with use_fast=True")
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    token_turns: list[int | None] = [None] * len(ids)
    token_kinds: list[int | None] = [None] * len(ids)
    for t, (start, end) in enumerate(offsets):
        if end > start:
            token_turns[t], token_kinds[t] = turns[end - 1], kinds[end - 1]
            if turns[end - 1] in labelled and kinds[end - 1] != HEADER and turns[start] != turns[end - 1]:
                _check_apart(text, (start, end), turns, prompt)
    real = [t for t in range(len(ids)) if token_turns[t] is not None]
    if not real:
        raise ValueError("the text tokenizes to no tokens")
    for t in range(len(ids)):
        if token_turns[t] is None:
            source = real[0] if t < real[0] else t - 1
            token_turns[t], token_kinds[t] = token_turns[source], token_kinds[source]
    return ids, token_turns, token_kinds  # type: ignore[return-value]


def _check_apart(text: str, span: tuple[int, int], turns: list[int], prompt: Collection[int]) -> None:
    """Refuse a labelled token (characters ``span`` of ``text``) that holds characters of a prompt turn."""
    start, end = span
    inside = sorted({turns[c] for c in range(start, end) if turns[c] in prompt})
    if inside:
        raise ValueError(
            f"the token {text[start:end]!r} (characters {start}..{end - 1}) spans prompt turn {inside[0]} "
            f"and labelled turn {turns[end - 1]}: the chat template puts no separator between them, so the "
            "label would cover prompt text; add one (a newline, an end-of-turn token)"
        )
