"""Generation with MAS prefill: the prompt is prefilled under its segment mask, decoding is causal.

    model, tokenizer, policy = segmask.load_model("path/to/model")
    [completion] = segmask.generate(model, tokenizer, [[{"role": "user", "content": "Hi!"}]], max_new_tokens=20)
    print(completion.text)

Two named steps. :func:`prefill` runs prompt tokens through the model under the MAS mask into a KV cache.
:func:`decode` hands that cache to transformers' own ``generate``, so greedy, sampling, beam search,
stopping criteria, ``max_new_tokens`` and EOS handling are all transformers'. Generated tokens are causal
(segment ``-1``): they see the whole prompt and never a later token, so the usual causal mask is exact for
them.

The hand-over works around two traps of ``generate``: it refuses a 4-D attention mask (so it can never
be given the MAS mask itself), and when the cache already holds the whole prompt it feeds the prompt again.
So the cache handed over holds all prompt tokens *but the last*, and ``generate`` runs the last token
itself. Its row of the MAS mask is the causal row (it is the last token, so ``j <= i`` for every key), so
this is exact provided the cached tokens already saw it where the mask says so:

- last token causal (``-1``, e.g. the assistant header): no earlier token attends to it; prefill all but
  the last token;
- last token in a bidirectional segment: the earlier tokens of that segment attend to it; prefill the
  whole prompt, then drop the last token from the cache (``cache.crop(-1)``): the entries left were
  computed with it, and ``generate`` recomputes its own entry exactly.

Conversations that keep their cache across turns are :class:`segmask.chat.ChatSession`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from segmask import compat
from segmask.collate import Collator, pad_token_id
from segmask.detokenize import TextStream
from segmask.hook import ContextOverflowError, require_enabled
from segmask.overflow import context_length
from segmask.policies import MaskPolicy, check_policy
from segmask.segments import Encoded, encode_chat, encode_instruction, encode_text
from segmask.templates import DEFAULT_TEMPLATE

Conversation = list[dict[str, str]]
# a raw text (no chat template), a conversation (list of messages) or an instruction record
Prompt = str | Conversation | dict[str, str]


@dataclass(frozen=True)
class Completion:
    """One generated continuation: its text (special tokens removed) and new token ids (through EOS)."""

    text: str
    token_ids: list[int]


# --------------------------------------------------------------------------------------------- encoding


def encode_prompt(
    tokenizer,
    prompt: Prompt,
    policy: MaskPolicy,
    causal_sink: bool | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> Encoded:
    """Tokens and segment ids of one prompt, ready for generation.

    A conversation gets the chat template and the generation prompt (the assistant header, causal); an
    instruction record gets the instruction template without its answer; a raw string is tokenized as is
    and forms one prompt segment (all causal under ``causal``). ``causal_sink``: token 0 causal under
    ``mas``/``prefix`` (:func:`segmask.policies.sink_on`: ``None`` is the policy's default, on under ``mas``). ``template``: the instruction template of
    a record (:mod:`segmask.templates`; ``paper`` gives the official evaluation prompt).
    """
    check_policy(policy)
    if isinstance(prompt, str):
        return encode_text(tokenizer, prompt, policy, causal_sink=causal_sink)
    if isinstance(prompt, dict):
        return encode_instruction(
            tokenizer, prompt, policy=policy, include_answer=False, causal_sink=causal_sink, template=template
        )
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return encode_chat(
            tokenizer, prompt, policy=policy, add_generation_prompt=True, causal_sink=causal_sink
        )
    raise ValueError(
        "a prompt must be a string, a conversation (a non-empty list of {'role', 'content'} messages) "
        f"or an instruction record (a dict); got {type(prompt).__name__}"
    )


def as_prompt_list(inputs: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """``inputs`` as a list of prompts: one prompt (string, conversation, record) or a sequence of them."""
    if isinstance(inputs, (str, dict)):
        return [inputs]
    if isinstance(inputs, list) and inputs and all(isinstance(m, dict) and "role" in m for m in inputs):
        return [inputs]  # one conversation
    if isinstance(inputs, (list, tuple)) and inputs:
        return list(inputs)
    raise ValueError("inputs must be a prompt or a non-empty list of prompts")


def left_pad(encoded: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch prompts with left padding: ``input_ids``, ``segment_ids``, ``attention_mask``, each ``[B, L]``."""
    batch = Collator(pad_token_id=pad_token_id, padding_side="left")(list(encoded))
    return {key: batch[key] for key in ("input_ids", "segment_ids", "attention_mask")}


# --------------------------------------------------------------------------------------------- prefill


def position_ids(attention_mask: torch.Tensor | None, past: int, q_len: int, batch_size: int) -> torch.Tensor:
    """Positions ``[B, Q]`` of the ``Q`` new tokens after ``past`` cached ones, as ``generate`` numbers them.

    With a padding mask ``[B, past + Q]`` a position counts the real tokens before it (padding gets 0).
    """
    if attention_mask is None:
        return torch.arange(past, past + q_len).unsqueeze(0).expand(batch_size, q_len)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -q_len:]


def new_cache(model: torch.nn.Module):
    """An empty dynamic KV cache for ``model``."""
    return DynamicCache(config=model.config)


@torch.no_grad()
def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache=None,
    logits_to_keep: int = 0,
) -> tuple[torch.Tensor, Any]:
    """Run prompt tokens through ``model`` under the MAS mask, appending their keys and values to ``cache``.

    ``input_ids`` and ``segment_ids`` are ``[B, Q]`` (the new tokens; tokens already in ``cache`` count
    as causal, so no segment may continue from the cache into them). ``attention_mask`` is ``[B, K]``
    over cached and new tokens (1 real, 0 padding), or None without padding. Returns the logits
    ``[B, Q, V]`` (``[B, logits_to_keep, V]``, the last positions only, when ``logits_to_keep > 0``) and
    the cache, now holding ``K`` tokens.
    """
    if input_ids.shape != segment_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and segment_ids {tuple(segment_ids.shape)} differ"
        )
    require_enabled(model, segment_ids)
    cache = new_cache(model) if cache is None else cache
    batch_size, q_len = input_ids.shape
    device = model.device
    positions = position_ids(attention_mask, cache.get_seq_length(), q_len, batch_size)
    outputs = model(
        input_ids=input_ids.to(device),
        segment_ids=segment_ids.to(device),
        attention_mask=None if attention_mask is None else attention_mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        **({"logits_to_keep": logits_to_keep} if logits_to_keep else {}),
        **compat.cache_kwargs(model, cache),
    )
    return outputs.logits, compat.output_cache(outputs)


def prefill_for_decoding(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache=None,
):
    """Prefill a prompt so that ``generate`` continues it exactly: the cache gets all tokens but the last.

    Shapes as in :func:`prefill`. If the last token is causal in every row, the earlier tokens are
    prefilled alone; otherwise the whole prompt is prefilled and its last token dropped from the cache
    (see the module docstring for why both are exact). Returns the cache.
    """
    cache = new_cache(model) if cache is None else cache
    if bool((segment_ids[:, -1] < 0).all()):
        if input_ids.shape[1] > 1:
            mask = None if attention_mask is None else attention_mask[:, :-1]
            _, cache = prefill(model, input_ids[:, :-1], segment_ids[:, :-1], mask, cache)
        return cache
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()  # lets sliding-window layers past their window be cropped back
    _, cache = prefill(model, input_ids, segment_ids, attention_mask, cache)
    cache.crop(-1)
    return cache


# --------------------------------------------------------------------------------------------- decode


def new_tokens(model: torch.nn.Module, prompt_length: int, generation_kwargs: dict) -> int:
    """How many tokens ``generate`` may add to a prompt of ``prompt_length``: ``max_new_tokens``, else what
    ``max_length`` leaves (the call's arguments first, then its ``generation_config``, then the model's)."""
    configs = [generation_kwargs, generation_kwargs.get("generation_config") or model.generation_config]
    for config in configs:
        value = config.get("max_new_tokens") if isinstance(config, dict) else config.max_new_tokens
        if value is not None:
            return int(value)
        value = config.get("max_length") if isinstance(config, dict) else config.max_length
        if value is not None:
            return max(0, int(value) - prompt_length)
    return 0


def check_context(model: torch.nn.Module, prompt_length: int, generation_kwargs: dict) -> None:
    """Raise :class:`ContextOverflowError` if the prompt and the new tokens exceed the model's positions
    (``max_position_embeddings``): past them a model writes garbage, or crashes deep in torch."""
    context = context_length(model)
    wanted = new_tokens(model, prompt_length, generation_kwargs)
    if context is not None and prompt_length + wanted > context:
        raise ContextOverflowError(
            f"the prompt has {prompt_length} tokens and up to {wanted} new tokens are asked for, "
            f"{prompt_length + wanted} in all, more than the model's context of {context} positions; "
            f"shorten the prompt or ask for fewer new tokens (max_new_tokens)"
        )


def expand_size(model: torch.nn.Module, generation_kwargs: dict) -> int:
    """How many rows ``generate`` makes of each prompt: ``max(num_beams, num_return_sequences)``."""
    config = generation_kwargs.get("generation_config") or model.generation_config
    beams = generation_kwargs.get("num_beams", config.num_beams) or 1
    returns = generation_kwargs.get("num_return_sequences", config.num_return_sequences) or 1
    return max(int(beams), int(returns))


@torch.no_grad()
def decode(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, **generation_kwargs
):
    """Continue a prefilled prompt causally with transformers' ``generate``.

    ``input_ids`` and ``attention_mask`` are the whole prompt ``[B, L]`` (the 2-D padding mask, never the
    MAS mask); ``cache`` holds its first ``L - 1`` tokens for ``B`` rows (see :func:`prefill_for_decoding`).
    ``generate`` does not expand a cache it is given, so it is repeated here for beams and multiple
    returned sequences. Returns what ``generate`` returns (sequences ``[B * R, L + N]`` by default).
    """
    if cache.get_seq_length() != input_ids.shape[1] - 1:
        raise ValueError(
            f"the cache holds {cache.get_seq_length()} tokens; decode needs all prompt tokens but the last "
            f"({input_ids.shape[1] - 1})"
        )
    repeats = expand_size(model, generation_kwargs)
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
    return model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        **compat.cache_kwargs(model, cache),
        **generation_kwargs,
    )


def generate_ids(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **generation_kwargs,
):
    """Prefill under the mask, then decode: the tensor-level core of :func:`generate`.

    ``input_ids``, ``segment_ids`` and ``attention_mask`` are ``[B, L]``, left-padded. Returns what
    ``generate`` returns: sequences ``[B * R, L + N]`` (prompt included) unless asked for a dict.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if input_ids.ndim != 2 or input_ids.shape != segment_ids.shape or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, segment_ids {tuple(segment_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must all be [batch, seq_len]"
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded for generation (a row ends in padding)")
    check_context(model, input_ids.shape[1], generation_kwargs)
    cache = prefill_for_decoding(model, input_ids, segment_ids, attention_mask)
    return decode(model, input_ids, attention_mask, cache, **generation_kwargs)


def generate(
    model: torch.nn.Module,
    tokenizer,
    inputs: Prompt | Sequence[Prompt],
    policy: MaskPolicy = "mas",
    causal_sink: bool | None = None,
    template: str = DEFAULT_TEMPLATE,
    **generation_kwargs,
) -> list[Completion]:
    """Generate for one prompt or a list of them with MAS prefill; returns one :class:`Completion` per row.

    A prompt is a conversation (list of ``{"role", "content"}`` messages), an instruction record or a raw
    string (see :func:`encode_prompt`). Prompts are batched with left padding. ``generation_kwargs`` go
    to transformers' ``generate`` (``max_new_tokens``, ``do_sample``, ``num_beams``, ...); with
    ``num_return_sequences=R`` the list holds ``R`` consecutive completions per prompt. ``causal_sink``
    keeps each prompt's token 0 causal under ``mas``/``prefix`` (:func:`segmask.policies.sink_on`: ``None`` is the policy's default, on under ``mas``);
    ``template`` is the instruction template of record prompts (:mod:`segmask.templates`).
    """
    policy = check_policy(policy)
    prompts = as_prompt_list(inputs)
    pad_id = pad_token_id(tokenizer)
    batch = left_pad([encode_prompt(tokenizer, p, policy, causal_sink, template) for p in prompts], pad_id)
    generation_kwargs.setdefault("pad_token_id", pad_id)
    output = generate_ids(
        model, batch["input_ids"], batch["segment_ids"], batch["attention_mask"], **generation_kwargs
    )
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    new_tokens = sequences[:, batch["input_ids"].shape[1] :]
    stops = eos_token_ids(model, tokenizer)
    return [completion(tokenizer, row.tolist(), stops) for row in new_tokens]


def completion(tokenizer, token_ids: list[int], eos_ids: set[int]) -> Completion:
    """Cut generated ids after the first EOS (dropping the padding ``generate`` adds) and decode them."""
    for index, token in enumerate(token_ids):
        if token in eos_ids:
            token_ids = token_ids[: index + 1]
            break
    return Completion(text=tokenizer.decode(token_ids, skip_special_tokens=True), token_ids=token_ids)


def eos_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Every id that ends generation: the model's generation config and the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


# --------------------------------------------------------------------------------------------- streaming


def stream(
    model: torch.nn.Module,
    tokenizer,
    prompt: Prompt,
    policy: MaskPolicy = "mas",
    causal_sink: bool | None = None,
    template: str = DEFAULT_TEMPLATE,
    **generation_kwargs,
) -> Iterator[str]:
    """Generate for one prompt, yielding text pieces as they are decoded (``causal_sink`` and ``template`` as
    in :func:`generate`)."""
    policy = check_policy(policy)
    encoded = encode_prompt(tokenizer, prompt, policy, causal_sink, template)
    input_ids = torch.tensor([encoded.input_ids])
    segment_ids = torch.tensor([encoded.segment_ids])
    generation_kwargs.setdefault("pad_token_id", pad_token_id(tokenizer))
    yield from streamed(
        tokenizer,
        lambda streamer: generate_ids(model, input_ids, segment_ids, streamer=streamer, **generation_kwargs),
    )


class StreamCancelled(Exception):
    """Raised inside a generation thread whose stream the consumer stopped reading."""


class _Streamer(BaseStreamer):
    """``generate``'s streamer for one row: the prompt skipped, then text pieces as they become final
    (:class:`segmask.detokenize.TextStream`, special tokens skipped), to be iterated from another thread."""

    def __init__(self, tokenizer) -> None:
        self.text = TextStream(tokenizer)
        self.pieces: queue.Queue[str | None] = queue.Queue()
        self.prompt_seen = False
        self.cancelled = False

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled:
            raise StreamCancelled
        if not self.prompt_seen:  # generate's first call hands over the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if piece := self.text.push(token):
                self.pieces.put(piece)

    def end(self) -> None:
        if piece := self.text.flush():
            self.pieces.put(piece)
        self.pieces.put(None)

    def __iter__(self) -> Iterator[str]:
        while (piece := self.pieces.get()) is not None:
            yield piece


def streamed(tokenizer, run, result: list | None = None) -> Iterator[str]:
    """Run ``run(streamer)`` in a thread and yield the text it streams; its return value goes to ``result``.

    If the consumer stops early (``close()``, an exception such as Ctrl-C), the generation is cancelled at
    its next token and the thread joined, so nothing keeps running in the background.
    """

    streamer = _Streamer(tokenizer)
    failure: list[BaseException] = []

    def target() -> None:
        try:
            output = run(streamer)
            if result is not None:
                result.append(output)
        except BaseException as error:  # re-raised in the caller's thread below
            failure.append(error)
            streamer.end()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        streamer.cancelled = True
        thread.join()
    if failure:
        raise failure[0]
