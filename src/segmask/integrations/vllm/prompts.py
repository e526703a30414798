"""Segment ids of a prompt from its token ids alone, equal to :func:`segmask.segments.encode_chat`.

vLLM hands the model token ids and nothing else: no messages, no per-request side channel. So the plugin
recovers the conversation from the ids and asks :func:`~segmask.segments.encode_chat` (the one encoder) for
its segments::

    segmenter = PromptSegmenter(tokenizer, policy="mas")        # once, at model load
    segmenter(prompt_ids)   # == encode_chat(tokenizer, messages, "mas", add_generation_prompt=True).segment_ids

How, once per template and then per prompt:

1. **Shapes, from the template.** A conversation shape is an optional system message, then ``n`` user
   turns with the assistant turns between them, then the generation prompt. Rendering a shape with unique
   markers as contents (as :mod:`segmask.turns` does) gives the template text around each content: the
   *pieces*. They depend on the shape only, so each is rendered once and kept.
2. **Contents, from the prompt.** The prompt's ids are decoded to text (each run between special tokens
   alone, so a tokenizer that prepends a space to every run reads back as it was written). A shape fits
   the text if the text starts with its first piece, ends with its last, and each content runs to the
   next occurrence of the following piece.
3. **Proof, by re-encoding.** The fitted messages go through ``encode_chat``; only if its ``input_ids``
   are the prompt's ids exactly are its ``segment_ids`` used. A segmentation is never guessed.

Shapes are tried from the most user turns down (at most one more than the times the user-to-assistant
piece occurs), without a system message before with one: a template that adds a default system prompt
(SmolLM2, Qwen2.5) renders "no system message" and "that default text as the system message" identically,
and a client that sends no system message is the common case.

**Fallback.** A prompt that fits no shape (a raw ``/v1/completions`` text, tool turns, a conversation
ending in an assistant turn, a template that folds turns together beyond recovery) gets segmask's rule for
raw text, :func:`segmask.segments.encode_tokens`: the whole prompt one segment (the sink per the policy),
as ``segmask.generate`` and ``segmask serve`` treat a raw string. It is logged once per process.

**Preemption.** vLLM recomputes a preempted request as prompt plus the tokens generated so far. Those
extra tokens are causal (-1), so a recent prompt that the ids start with gives the segments exactly; the
segmenter remembers the last :data:`REMEMBERED` prompts for this.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from segmask import turns
from segmask.policies import MaskPolicy, check_policy
from segmask.segments import encode_chat, encode_tokens

logger = logging.getLogger(__name__)

#: how many prompts a segmenter remembers for preempted requests
REMEMBERED = 256
#: at most this many user turns are tried (a longer conversation falls back)
MAX_TURNS = 512

Pieces = list[str]


def shape(system: bool, users: int) -> list[dict[str, str]]:
    """The marked conversation of a shape: optional system, ``users`` user turns, assistants between."""
    roles = (["system"] if system else []) + ["user", "assistant"] * (users - 1) + ["user"]
    return [{"role": role, "content": turns.marker(index)} for index, role in enumerate(roles)]


def fit(text: str, pieces: Pieces) -> list[str] | None:
    """The contents that make ``pieces`` (template text around each content) render ``text``, or None.

    Each content ends at the first occurrence of the piece after it; the last ends where the last piece
    (the end of the template's text) begins.
    """
    last = len(text) - len(pieces[-1])
    if not text.startswith(pieces[0]) or not text.endswith(pieces[-1]) or last < len(pieces[0]):
        return None
    position, contents = len(pieces[0]), []
    for piece in pieces[1:-1]:
        end = text.find(piece, position, last) if piece else -1  # two adjacent contents cannot be told apart
        if end < 0:
            return None
        contents.append(text[position:end])
        position = end + len(piece)
    if position > last:
        return None
    contents.append(text[position:last])
    return contents


class PromptSegmenter:
    """Prompt token ids -> segment ids, as :func:`segmask.segments.encode_chat` gives them for the
    conversation whose chat-template rendering (with the generation prompt) tokenizes to those ids.

    ``chat_template`` overrides the tokenizer's; with neither, every prompt takes the fallback (raw text).
    ``causal_sink``: as in ``encode_chat`` (``None``: the policy's default).
    """

    def __init__(
        self,
        tokenizer,
        policy: MaskPolicy,
        causal_sink: bool | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.policy: MaskPolicy = check_policy(policy)
        self.causal_sink = causal_sink
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or None
        self._specials = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self._anchor = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
        self._pieces: dict[tuple[bool, int], Pieces | None] = {}
        self._remembered: OrderedDict[tuple[int, int], tuple[tuple[int, ...], list[int]]] = OrderedDict()
        self._warned = False
        if self.chat_template is None:
            logger.warning(
                "segmask: the tokenizer has no chat template; every prompt is one segment (raw text)"
            )
            self._warned = True

    def __call__(self, ids: Sequence[int]) -> list[int]:
        """Segment ids for ``ids`` (a whole prompt, or a preempted request's prompt and output)."""
        ids = list(ids)
        segments = self.chat_segments(ids)
        if segments is None:
            segments = self._recomputed(ids)
        if segments is None:
            if not self._warned:
                logger.warning(
                    "segmask: a prompt of %d tokens is no chat under the model's chat template; it is one "
                    "segment, as raw text (logged once)",
                    len(ids),
                )
                self._warned = True
            return encode_tokens(ids, self.policy, self.causal_sink).segment_ids
        self._remember(ids, segments)
        return segments

    def chat_segments(self, ids: Sequence[int]) -> list[int] | None:
        """``encode_chat``'s segment ids for the conversation ``ids`` renders, or None if none does."""
        messages = self.conversation(ids)
        return None if messages is None else self._encode(messages, ids)

    def conversation(self, ids: Sequence[int]) -> list[dict[str, str]] | None:
        """The messages whose rendering (with the generation prompt) tokenizes to exactly ``ids``."""
        if self.chat_template is None or not ids:
            return None
        plain = self.text(ids)
        found = self._read(plain, ids)
        if found is None:
            spaced = self.text(ids, spaced=True)
            found = self._read(spaced, ids) if spaced != plain else None
        return found

    def _read(self, text: str, ids: Sequence[int]) -> list[dict[str, str]] | None:
        """The first shape (most user turns first, no system message first) that fits ``text`` and
        re-encodes to ``ids``."""
        separator = self._separator()
        most = min(text.count(separator) + 1 if separator else 1, MAX_TURNS)
        for users in range(most, 0, -1):
            for system in (False, True):
                pieces = self.pieces(system, users)
                contents = None if pieces is None else fit(text, pieces)
                if contents is None:
                    continue
                roles = [message["role"] for message in shape(system, users)]
                messages = [{"role": role, "content": c} for role, c in zip(roles, contents)]
                if self._encode(messages, ids) is not None:
                    return messages
        return None

    def text(self, ids: Sequence[int], spaced: bool = False) -> str:
        """``ids`` as text: each run between added tokens decoded alone, added tokens as written.

        A tokenizer that prepends a space to each run (SentencePiece's ``Metaspace``) writes ``"<s>[INST]"``
        and ``"<s> [INST]"`` alike; decoding drops that space, ``spaced`` keeps it.
        """
        parts, run = [], []
        for token in [*ids, None]:
            if token is not None and token not in self._specials:
                run.append(token)
                continue
            if run:
                parts.append(self._decode(run, spaced))
                run = []
            if token is not None:
                parts.append(self._specials[token])
        return "".join(parts)

    def pieces(self, system: bool, users: int) -> Pieces | None:
        """The template text around each content of a shape (None if the template refuses or reorders it)."""
        key = (system, users)
        if key not in self._pieces:
            marked = shape(system, users)
            try:
                rendered = turns.render(self.tokenizer, marked, True, self.chat_template, {})
            except ValueError:
                self._pieces[key] = None
                return None
            parts = turns.MARKER.split(rendered)
            order = [int(index) for index in parts[1::2]]
            self._pieces[key] = parts[0::2] if order == list(range(len(marked))) else None
        return self._pieces[key]

    def _separator(self) -> str:
        """The template text between a user's content and the next assistant's (its count bounds the turns)."""
        for system in (False, True):
            pieces = self.pieces(system, 2)
            if pieces is not None:
                return pieces[2 if system else 1]
        return ""

    def _decode(self, run: list[int], spaced: bool) -> str:
        if not spaced:
            return self.tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        anchor = self._decode(self._anchor, False)  # decoded after a plain token, the run keeps its space
        return self._decode(self._anchor + run, False)[len(anchor) :]

    def _encode(self, messages: list[dict[str, str]], ids: Sequence[int]) -> list[int] | None:
        try:
            encoded = encode_chat(
                self.tokenizer,
                messages,
                policy=self.policy,
                add_generation_prompt=True,
                chat_template=self.chat_template,
                causal_sink=self.causal_sink,
            )
        except ValueError:
            return None
        return encoded.segment_ids if encoded.input_ids == list(ids) else None

    def _remember(self, ids: list[int], segments: list[int]) -> None:
        key = (len(ids), hash(tuple(ids)))
        self._remembered[key] = (tuple(ids), segments)
        self._remembered.move_to_end(key)
        while len(self._remembered) > REMEMBERED:
            self._remembered.popitem(last=False)

    def _recomputed(self, ids: list[int]) -> list[int] | None:
        """A remembered prompt's segments, then -1 for the output after it (the longest prompt wins)."""
        for length in sorted({length for length, _ in self._remembered if length < len(ids)}, reverse=True):
            prompt = tuple(ids[:length])
            remembered = self._remembered.get((length, hash(prompt)))
            if remembered is not None and remembered[0] == prompt:
                return remembered[1] + [-1] * (len(ids) - length)
        return None
