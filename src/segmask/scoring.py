"""Scoring: encoded prompts to predictions, by the log-likelihood of candidate answers or by generation.

The scoring is task-neutral: :func:`continuation_logprobs` scores the continuations of any encoded prompt
(segment ids under its mask policy) against one prefill, :func:`rank_candidates` picks the best of labelled
candidate answers, and :func:`chat_candidates` builds a chat prompt and its candidates as training encodes
them. A task format (:mod:`segmask.tasks`) supplies prompts and candidates, :mod:`segmask.results` turns the
predictions into scores and files, and :mod:`segmask.evaluation` runs the commonsense suite, where a record
is scored one of two ways (``segmask eval --scoring``):

    generate   the paper's protocol: the instruction template, beam search (4 beams, at most 32 new tokens,
               greedy as an option) after a MAS prefill of the prompt; the prediction is the first label
               found in the generated text (``extract``: ``strict``, segmask's whole-word, any-case reading,
               or ``official``, the paper's; none found: unparseable, counted wrong).
    loglik     the prompt is prefilled once under its mask policy; every candidate answer, the training
               target ``"the correct answer is <label>"`` with its EOS, is then scored causally against that
               KV cache and the candidate with the highest summed log-probability is the prediction.

A prompt whose answer would not fit the model's context is never scored as is: the ``overflow`` policy of
:mod:`segmask.overflow` refuses, truncates or skips it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from segmask import compat, results
from segmask.collate import pad_token_id
from segmask.generation import completion, eos_token_ids, generate_ids, left_pad, prefill
from segmask.overflow import Overflow, context_length, fit_prompt
from segmask.segments import Encoded, encode_chat, encode_instruction
from segmask.tasks import commonsense
from segmask.templates import DEFAULT_TEMPLATE, check_template

# -------------------------------------------------------------------------------------------- loglik


@dataclass(frozen=True)
class ContinuationScore:
    """Summed log-probability of a continuation and whether greedy decoding would produce it."""

    logprob: float
    is_greedy: bool


@torch.inference_mode()
def continuation_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[int],
    segment_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
) -> list[ContinuationScore]:
    """Score several causal continuations of one prompt, prefilling the prompt once.

    The prompt (``P`` tokens, under ``segment_ids``, e.g. MAS segments) is prefilled into a KV cache
    (:func:`segmask.generation.prefill`); the cache is then repeated for the ``C`` continuations, which run as
    one right-padded causal batch ``[C, W]``. Token ``k`` of a continuation is predicted by the prompt's last
    logits (``k = 0``) or by the continuation's own position ``k - 1``. ``model`` must have gone through
    :func:`segmask.enable`.
    """
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    if len(prompt_ids) != len(segment_ids):
        raise ValueError(f"{len(prompt_ids)} prompt tokens but {len(segment_ids)} segment ids")
    if not prompt_ids:
        raise ValueError("empty prompt: nothing to condition on")
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    logits, cache = prefill(model, ids, torch.tensor([list(segment_ids)], dtype=torch.long), logits_to_keep=1)
    last = logits[:, -1]  # [1, V]
    count, width = len(continuations), max(len(c) for c in continuations)
    device = last.device
    tokens = torch.zeros(count, width, dtype=torch.long, device=device)
    real = torch.zeros(count, width, dtype=torch.bool, device=device)
    for row, continuation in enumerate(continuations):
        tokens[row, : len(continuation)] = torch.tensor(list(continuation), device=device)
        real[row, : len(continuation)] = True
    predictors = last.float().log_softmax(-1)[:, None].expand(count, 1, -1)  # [C, 1, V]
    if width > 1:
        cache.batch_repeat_interleave(count)
        attention_mask = torch.cat(
            [torch.ones(count, len(prompt_ids), dtype=torch.long, device=device), real.long()], 1
        )
        logits = model(
            input_ids=tokens[:, :-1],
            attention_mask=attention_mask[:, :-1],
            **compat.cache_kwargs(model, cache),
        ).logits
        predictors = torch.cat([predictors, logits.float().log_softmax(-1)], dim=1)  # [C, W, V]
    token_logprobs = predictors.gather(-1, tokens[..., None]).squeeze(-1).masked_fill(~real, 0.0)
    greedy = (predictors.argmax(-1) == tokens) | ~real
    return [ContinuationScore(float(lp), bool(g)) for lp, g in zip(token_logprobs.sum(-1), greedy.all(-1))]


def rank_candidates(
    model: nn.Module, prompt: Encoded, candidates: Mapping[str, Sequence[int]]
) -> tuple[str, dict[str, float]]:
    """The best of ``candidates`` (label -> the answer's token ids after ``prompt``) and every label's
    summed log-probability; a tie goes to the label listed first."""
    scores = continuation_logprobs(model, prompt.input_ids, prompt.segment_ids, list(candidates.values()))
    by_label = {label: score.logprob for label, score in zip(candidates, scores)}
    return max(by_label, key=by_label.__getitem__), by_label


def chat_candidates(
    tokenizer,
    messages: list[dict[str, str]],
    choices: Sequence[str],
    policy: str,
    causal_sink: bool | None = None,
) -> tuple[Encoded, dict[str, list[int]]]:
    """A chat prompt (``messages``, then the assistant header) and each choice's answer tokens as the
    assistant's turn, exactly as training encodes them: the input of :func:`rank_candidates`.
    ``causal_sink``: token 0 causal under ``mas``/``prefix`` (:func:`segmask.policies.sink_on`: ``None`` is the policy's default, on under ``mas``)."""
    prompt = encode_chat(
        tokenizer, messages, policy=policy, add_generation_prompt=True, causal_sink=causal_sink
    )
    cut = len(prompt.input_ids)
    candidates = {}
    for choice in choices:
        conversation = [*messages, {"role": "assistant", "content": choice}]
        full = encode_chat(tokenizer, conversation, policy, causal_sink=causal_sink)
        if full.input_ids[:cut] != prompt.input_ids or any(s != -1 for s in full.segment_ids[cut:]):
            raise ValueError("the prompt is not a prefix of prompt + answer, or the answer is not causal")
        candidates[choice] = full.input_ids[cut:]
    return prompt, candidates


def loglik_predictions(
    model: nn.Module,
    tokenizer,
    task: commonsense.Task,
    policy: str,
    progress: bool = True,
    done: Mapping[int, results.Prediction] | None = None,
    on_prediction: Callable[[results.Prediction], None] | None = None,
    overflow: Overflow = "error",
    causal_sink: bool | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> list[results.Prediction]:
    """Predict each record of ``task`` by the highest-scoring candidate answer (see the module docstring).

    Records whose index is in ``done`` keep that prediction (a resumed run); ``on_prediction`` sees each new
    one as soon as it is made. Every prompt is fitted to the model's context (:func:`fit_prompt`) before the
    first is scored; a skipped record has no prediction. ``causal_sink``: each prompt's token 0 causal under
    ``mas``/``prefix`` (:func:`segmask.policies.sink_on`: ``None`` is the policy's default, on under ``mas``). ``template`` must be ``alpaca``: the
    ``paper`` evaluation prompt is no prefix of its training text (it ends in 16 spaces that the training
    text tokenizes otherwise), so no candidate answer continues it as training did.
    """
    if check_template(template) != "alpaca":
        raise ValueError(
            f"loglik scoring needs template alpaca, got {template!r}: the paper's evaluation prompt is no prefix "
            "of its training text; score it with generate (the paper's protocol)"
        )
    done = done or {}
    context = context_length(model)
    fitted: dict[int, tuple[Encoded, int, dict[str, list[int]]]] = {}
    for index, (record, labels) in enumerate(zip(task.records, task.candidates)):
        if index in done:
            continue
        prompt = encode_instruction(
            tokenizer, record, policy=policy, include_answer=False, causal_sink=causal_sink
        )
        candidates = {
            label: commonsense.answer_continuation(tokenizer, record, label, policy, prompt, causal_sink)
            for label in labels
        }
        room = max(len(ids) for ids in candidates.values())
        kept = fit_prompt(prompt, room, context, overflow, f"{task.name} record {index}")
        if kept is not None:
            fitted[index] = (kept, len(prompt) - len(kept), candidates)
    predictions = []
    for index in tqdm(range(len(task.records)), desc=f"{task.name} (loglik)", disable=not progress):
        if index in done:
            predictions.append(done[index])
            continue
        if index not in fitted:
            continue  # skipped: over the context
        prompt, cut, candidates = fitted[index]
        best, by_label = rank_candidates(model, prompt, candidates)
        predictions.append(
            results.Prediction(
                task=task.name,
                index=index,
                prompt=tokenizer.decode(prompt.input_ids),
                output=commonsense.ANSWER_PREFIX + best,
                prediction=best,
                gold=task.records[index]["answer"],
                scores=by_label,
                truncated=cut,
            )
        )
        if on_prediction is not None:
            on_prediction(predictions[-1])
    return predictions


# ------------------------------------------------------------------------------------------ generate


def generate_predictions(
    model: nn.Module,
    tokenizer,
    task: commonsense.Task,
    policy: str,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
    done: Mapping[int, results.Prediction] | None = None,
    on_prediction: Callable[[results.Prediction], None] | None = None,
    overflow: Overflow = "error",
    causal_sink: bool | None = None,
    template: str = DEFAULT_TEMPLATE,
    extractor: str = "strict",
) -> list[results.Prediction]:
    """The paper's protocol: MAS prefill, beam search, the first label found in the generated text.

    ``done``, ``on_prediction``, ``overflow`` and ``causal_sink`` as in :func:`loglik_predictions` (the room
    a prompt needs is ``max_new_tokens``). ``template``: the instruction template of the prompts
    (:mod:`segmask.templates`; ``paper`` gives the official evaluation prompt); ``extractor``: how the label
    is read back (:func:`segmask.tasks.commonsense.extract`: ``strict`` or ``official``).
    """
    check_template(template)
    done = done or {}
    by_index = dict(done)
    context = context_length(model)
    fitted: dict[int, tuple[Encoded, int]] = {}
    for index, record in enumerate(task.records):
        if index in done:
            continue
        prompt = encode_instruction(
            tokenizer, record, policy=policy, include_answer=False, causal_sink=causal_sink, template=template
        )
        kept = fit_prompt(prompt, max_new_tokens, context, overflow, f"{task.name} record {index}")
        if kept is not None:
            fitted[index] = (kept, len(prompt) - len(kept))
    todo = list(fitted)
    bar = tqdm(
        total=len(task.records), initial=len(task.records) - len(todo), desc=f"{task.name} (generate)",
        disable=not progress,
    )  # fmt: skip
    for start in range(0, len(todo), batch_size):
        indices = todo[start : start + batch_size]
        prompts = [fitted[index][0] for index in indices]
        completions = _generate(
            model, tokenizer, prompts, num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens
        )
        for index, prompt, done_text in zip(indices, prompts, completions):
            by_index[index] = results.Prediction(
                task=task.name,
                index=index,
                prompt=tokenizer.decode(prompt.input_ids),
                output=done_text.text,
                prediction=commonsense.extract(done_text.text, task.name, task.labels, extractor),
                gold=task.records[index]["answer"],
                truncated=fitted[index][1],
            )
            if on_prediction is not None:
                on_prediction(by_index[index])
        bar.update(len(indices))
    bar.close()
    return [by_index[index] for index in range(len(task.records)) if index in by_index]


def _generate(model: nn.Module, tokenizer, prompts: Sequence[Encoded], **generation_kwargs) -> list:
    """:func:`segmask.generation.generate` for prompts already encoded (and fitted to the context)."""
    pad_id = pad_token_id(tokenizer)
    batch = left_pad(prompts, pad_id)
    output = generate_ids(
        model, batch["input_ids"], batch["segment_ids"], batch["attention_mask"], pad_token_id=pad_id,
        **generation_kwargs,
    )  # fmt: skip
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    stops = eos_token_ids(model, tokenizer)
    return [completion(tokenizer, row.tolist(), stops) for row in new_tokens]
