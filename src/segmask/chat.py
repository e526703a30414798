"""Chat with a kept KV cache: :class:`ChatSession` and the rule for which cached entries stay exact.

    chat = ChatSession(model, tokenizer, policy="mas", system="You are terse.", max_new_tokens=64)
    print(chat.send("Hi!"))

A session keeps the cache across turns: a new turn is prefilled alone, as new segments against the cache
(:func:`segmask.generation.prefill_for_decoding`), then decoded causally. That is exact because no segment
continues across the boundary (a token sees the cached past causally, and no cached token may see a new
one), and :func:`segmask.masks.reusable_prefix` reuses only caches for which this holds, re-prefilling the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from segmask.generation import (
    Conversation,
    check_context,
    completion,
    decode,
    eos_token_ids,
    expand_size,
    new_cache,
    pad_token_id,
    prefill_for_decoding,
    streamed,
)
from segmask.masks import reusable_prefix
from segmask.policies import MaskPolicy, check_policy
from segmask.segments import encode_chat

DEFAULT_CHAT_TOKENS = 256


@dataclass(frozen=True)
class TurnStats:
    """How a turn's prompt was prefilled: tokens reused from the cache and tokens computed anew."""

    reused: int
    prefilled: int


class ChatSession:
    """A conversation that keeps its KV cache across turns.

        chat = ChatSession(model, tokenizer, policy="mas", system="You are terse.", max_new_tokens=64)
        print(chat.send("Hi!"))
        for piece in chat.stream("And then?"):
            print(piece, end="")

    Each turn renders the whole conversation with the chat template, reuses the cache for the longest
    prefix that :func:`segmask.masks.reusable_prefix` allows, and prefills only the rest (normally the new user turn),
    so the result equals re-prefilling the whole conversation. Under ``prefix`` the whole prompt is one
    segment, so every earlier token would have to see the new turn: the cache cannot be reused and each
    turn re-prefills the conversation (exact, slower). ``causal_sink`` keeps token 0 causal under
    ``mas``/``prefix`` (:func:`segmask.policies.sink_on`: ``None`` is the policy's default, on under ``mas``); as it is a leading causal token, the cache
    after it is reused as before. ``policy``, ``causal_sink``, ``system`` and the messages can be changed
    between turns; the cache follows.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        policy: MaskPolicy = "mas",
        system: str | None = None,
        causal_sink: bool | None = None,
        **generation_kwargs,
    ) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("ChatSession needs a tokenizer with a chat template")
        self.model = model
        self.tokenizer = tokenizer
        self.policy: MaskPolicy = check_policy(policy)
        self.causal_sink = causal_sink
        self.system = system
        generation_kwargs.setdefault("pad_token_id", pad_token_id(tokenizer))
        if "max_new_tokens" not in generation_kwargs and "max_length" not in generation_kwargs:
            generation_kwargs["max_new_tokens"] = DEFAULT_CHAT_TOKENS
        self.generation_kwargs = generation_kwargs
        self.turns: list[dict[str, str]] = []  # user and assistant messages, without the system message
        self.last_turn: TurnStats | None = None
        self._cache = None
        self._cached_ids: list[int] = []
        self._cached_segments: list[int] = []

    @property
    def messages(self) -> Conversation:
        """The conversation so far, with the system message first if there is one."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    @property
    def cached_tokens(self) -> int:
        """How many tokens the KV cache holds."""
        return len(self._cached_ids)

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (and the cache); set a new system message if given, else keep it."""
        self.turns = []
        if system is not None:
            self.system = system
        self._drop_cache()

    def set_policy(self, policy: MaskPolicy) -> None:
        """Switch the mask policy; the next turn re-prefills what the new segmentation changes."""
        self.policy = check_policy(policy)

    def send(self, text: str) -> str:
        """Add a user message and return the assistant's reply."""
        input_ids, prompt_segments = self._prepare(text)
        try:
            output = decode(
                self.model, input_ids, torch.ones_like(input_ids), self._cache, **self.generation_kwargs
            )
        except BaseException:
            self._drop_cache()  # partly extended
            raise
        return self._finish(text, input_ids, prompt_segments, output)

    def stream(self, text: str) -> Iterator[str]:
        """Add a user message and yield the reply's text pieces as they are generated.

        A reply not read to the end (the iterator closed, Ctrl-C) is cancelled and leaves no turn behind.
        """
        input_ids, prompt_segments = self._prepare(text)
        result: list = []
        mask = torch.ones_like(input_ids)
        try:
            yield from streamed(
                self.tokenizer,
                lambda streamer: decode(
                    self.model, input_ids, mask, self._cache, streamer=streamer, **self.generation_kwargs
                ),
                result,
            )
        finally:
            if not result:
                self._drop_cache()  # partly extended
        self._finish(text, input_ids, prompt_segments, result[0])

    def _prepare(self, text: str) -> tuple[torch.Tensor, list[int]]:
        """Encode the conversation with the new user message and prefill what the cache lacks."""
        encoded = encode_chat(
            self.tokenizer,
            self.messages + [{"role": "user", "content": text}],
            policy=self.policy,
            add_generation_prompt=True,
            causal_sink=self.causal_sink,
        )
        ids, segments = encoded.input_ids, encoded.segment_ids
        check_context(self.model, len(ids), self.generation_kwargs)
        # Keeping at most all tokens but the last is exact even inside the last token's segment: the cached
        # entries were computed with it, and generate recomputes the last token itself.
        reusable = min(reusable_prefix(self._cached_ids, self._cached_segments, ids, segments), len(ids) - 1)
        reused = self._keep_cache(reusable)
        try:
            self._cache = prefill_for_decoding(
                self.model, torch.tensor([ids[reused:]]), torch.tensor([segments[reused:]]), None, self._cache
            )
        except BaseException:
            self._drop_cache()  # partly extended
            raise
        self.last_turn = TurnStats(reused=reused, prefilled=len(ids) - reused)
        return torch.tensor([ids]), segments

    def _keep_cache(self, length: int) -> int:
        """Crop the cache to its first ``length`` tokens, or start afresh when it cannot be cropped (e.g. a
        sliding-window layer past its window). Returns how many tokens it keeps."""
        if self._cache is not None and length > 0:
            try:
                if length < self.cached_tokens:
                    self._cache.crop(length - self.cached_tokens)
                return length
            except (RuntimeError, ValueError):
                pass
        self._cache = new_cache(self.model)
        return 0

    def _finish(self, text: str, input_ids: torch.Tensor, prompt_segments: list[int], output) -> str:
        """Record the turn, and what the cache now holds (the prompt and all generated tokens but the last)."""
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        prompt_len = input_ids.shape[1]
        reply = completion(
            self.tokenizer, sequences[0, prompt_len:].tolist(), eos_token_ids(self.model, self.tokenizer)
        )
        self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
        cached = self._cache.get_seq_length()
        if expand_size(self.model, self.generation_kwargs) > 1 or cached > sequences.shape[1]:
            self._drop_cache()  # beams and multiple returns widen the cache: start afresh next turn
        else:
            self._cached_ids = sequences[0, :cached].tolist()
            self._cached_segments = (prompt_segments + [-1] * cached)[:cached]
        return reply.text

    def _drop_cache(self) -> None:
        self._cache = None
        self._cached_ids, self._cached_segments = [], []
