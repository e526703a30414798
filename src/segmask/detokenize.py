"""Text that grows token by token, sent only where it is final: the pieces join to the whole decode.

    text = TextStream(tokenizer)
    for token in generated:
        print(text.push(token), end="")     # "" while a character is incomplete
    print(text.flush())                     # the rest, at the end

Decoding a prefix of the tokens is not a prefix of decoding them all:

- a partial UTF-8 character decodes to one U+FFFD per byte it has so far, so trailing U+FFFDs are held;
- byte-fallback tokens (``<0xE7>``, in sentencepiece and tokenizers' ``ByteFallback``) are decoded as a
  run, special tokens skipped, and a run that is not valid UTF-8 turns *entirely* into U+FFFDs, so a later
  byte can spoil characters the run already completed: the text of an open run is held until a token that
  is not a byte ends it.

Held text is sent as soon as it is final, or by :meth:`flush`. The server's rows and
:func:`segmask.generation.stream` both stream through this one rule.
"""

from __future__ import annotations

import re
import weakref

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # how sentencepiece and tokenizers' ByteFallback name a byte


_BYTE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its byte ids


def byte_token_ids(tokenizer) -> frozenset[int]:
    """The ids of the tokenizer's byte-fallback tokens (``<0x00>`` to ``<0xFF>``; none in byte-level BPE).

    Read from the vocabulary once per tokenizer (Llama 3's has 128,256 tokens)."""
    try:
        return _BYTE_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = frozenset(i for token, i in tokenizer.get_vocab().items() if BYTE_TOKEN.fullmatch(token))
    try:
        _BYTE_IDS[tokenizer] = ids
    except TypeError:  # not weakly referenceable: read again next time
        pass
    return ids


class TextStream:
    """One sequence's generated text, decoded with ``skip_special_tokens`` and sent where final.

    ``byte_ids``: the tokenizer's byte-fallback ids (default: :func:`byte_token_ids`). ``hold`` characters at the end are
    held back on top (a server holds ``len(stop) - 1`` of them, which could still become a stop string).
    """

    def __init__(self, tokenizer, byte_ids: frozenset[int] | None = None, hold: int = 0) -> None:
        self.tokenizer = tokenizer
        self.byte_ids = byte_token_ids(tokenizer) if byte_ids is None else byte_ids
        self.special_ids = frozenset(tokenizer.all_special_ids)  # what decoding skips
        self.hold = hold
        self.tokens: list[int] = []
        self.sent = 0  # characters of text() sent so far
        self._in_byte_run = False  # the last token that decodes is a byte token

    def text(self) -> str:
        """The decode of every token so far."""
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; return the text that became final with it (often ``""``)."""
        self.add(token)
        text = self.text()
        return self.send(text, self.final(text))

    def add(self, token: int) -> None:
        """Add a token without sending anything (then :meth:`final` and :meth:`send`)."""
        self.tokens.append(token)
        if token not in self.special_ids:
            self._in_byte_run = token in self.byte_ids

    def final(self, text: str) -> int:
        """How much of ``text`` (:meth:`text`) is final: all but the held characters, nothing in a byte run."""
        if self._in_byte_run:
            return self.sent
        return min(len(text) - self.hold, len(text.rstrip("\ufffd")))

    def send(self, text: str, end: int) -> str:
        """Mark ``text[sent:end]`` sent (``text`` is :meth:`text`, or a cut of it) and return it."""
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent : end], end
        return piece

    def flush(self, text: str | None = None) -> str:
        """The rest of ``text`` (default: the whole decode), held or not: the sequence has ended."""
        text = self.text() if text is None else text
        return self.send(text, len(text))
