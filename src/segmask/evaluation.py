"""Score a model's answers under a mask policy: candidate continuations of encoded prompts, or generations.

    segmask eval --model ../shared/models/stories260K --data-dir ../shared/data/commonsense \\
        --tasks boolq,ARC-Easy --limit 20 --scoring loglik --mask mas --out runs/stories-mas.json

The scoring is task-neutral: :func:`rank_candidates` takes any encoded prompt (segment ids under its mask
policy) and the token ids of each candidate answer; a task format (:mod:`segmask.tasks`) supplies both, and
:mod:`segmask.results` turns the predictions into scores and files. :func:`evaluate` runs the commonsense
suite (:mod:`segmask.tasks.commonsense`) from one :class:`EvalConfig`. Two ways to score a record:

    generate   the paper's protocol: the instruction template, beam search (4 beams, at most 32 new tokens,
               greedy as an option) after a MAS prefill of the prompt; the prediction is the first label
               found in the generated text (``extract``: ``strict``, segmask's whole-word, any-case reading,
               or ``official``, the paper's; none found: unparseable, counted wrong).
    loglik     the prompt is prefilled once under its mask policy; every candidate answer, the training
               target ``"the correct answer is <label>"`` with its EOS, is then scored causally against that
               KV cache and the candidate with the highest summed log-probability is the prediction.

A prompt whose answer would not fit the model's context is never scored as is: the ``overflow`` policy of
:mod:`segmask.eval_overflow` refuses, truncates or skips it; each task's counts are in the results.

Accuracy comes with a 95% Wilson interval; the suite's score is the unweighted mean over tasks. Each run
writes ``results.json`` and ``results.predictions.jsonl`` (one line per record, for audit and for the paired
tests of :mod:`segmask.compare`).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn
from tqdm.auto import tqdm

from segmask import compat, results
from segmask.attention import enable
from segmask.collate import pad_token_id
from segmask.eval_overflow import OVERFLOWS, Overflow, context_length, fit_prompt, overflow_counts, resumable
from segmask.generation import completion, eos_token_ids, generate_ids, left_pad, prefill
from segmask.masks import check_policy
from segmask.segments import CAUSAL_SINK_HELP_RUN, Encoded, encode_chat, encode_instruction
from segmask.tasks import commonsense
from segmask.templates import DEFAULT_TEMPLATE, TEMPLATE_HELP, InstructionTemplate, check_template

Scoring = Literal["generate", "loglik"]
SCORINGS: tuple[str, ...] = get_args(Scoring)


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
    causal_sink: bool = False,
) -> tuple[Encoded, dict[str, list[int]]]:
    """A chat prompt (``messages``, then the assistant header) and each choice's answer tokens as the
    assistant's turn, exactly as training encodes them: the input of :func:`rank_candidates`.
    ``causal_sink``: token 0 causal under ``mas``/``prefix`` (:func:`segmask.segments.sink_segments`)."""
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
    causal_sink: bool = False,
    template: str = DEFAULT_TEMPLATE,
) -> list[results.Prediction]:
    """Predict each record of ``task`` by the highest-scoring candidate answer (see the module docstring).

    Records whose index is in ``done`` keep that prediction (a resumed run); ``on_prediction`` sees each new
    one as soon as it is made. Every prompt is fitted to the model's context (:func:`fit_prompt`) before the
    first is scored; a skipped record has no prediction. ``causal_sink``: each prompt's token 0 causal under
    ``mas``/``prefix`` (:func:`segmask.segments.sink_segments`). ``template`` must be ``alpaca``: the
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
    causal_sink: bool = False,
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


# ---------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run of the commonsense suite; validated on construction.

    ``tasks`` takes ``"boolq,piqa"`` or a list (kept as a tuple of unique names, in order); ``limit`` the
    first N records of each task, so runs with the same limit share their records. With ``out`` the results
    go to that JSON file, the predictions beside it, and an unfinished run's predictions to a journal that
    ``resume`` picks up (see :func:`evaluate`). ``num_beams``, ``max_new_tokens`` and ``batch_size`` are the
    decoding settings of ``generate`` scoring. ``causal_sink`` keeps each prompt's token 0 causal under
    ``mas``/``prefix`` (:func:`segmask.segments.sink_segments`); ``None`` is off here, and ``segmask eval``
    resolves it to the run's saved value (:func:`segmask.loading.resolve_causal_sink`). ``template`` is the
    instruction template of the prompts (:mod:`segmask.templates`; ``None`` is ``alpaca`` here, and ``segmask
    eval`` resolves it to the run's saved template); ``paper`` needs ``generate`` scoring. ``extract`` is how
    ``generate`` scoring reads a label (:func:`segmask.tasks.commonsense.extract`): ``strict`` (segmask's,
    the default) or ``official`` (the paper's).
    """

    # metadata["help"] is each field's line in `segmask eval --help`
    data_dir: str = field(metadata={"help": "folder of <task>_test.json or <task>/test.json files"})
    tasks: tuple[str, ...] = field(
        default=commonsense.SUITE,
        metadata={"help": "task names: boolq,piqa or boolq piqa (default: the whole suite)"},
    )
    policy: str = "mas"
    scoring: Scoring = field(default="generate", metadata={"help": "paper protocol or log-likelihood"})
    limit: int | None = field(default=None, metadata={"help": "first N records of each task (default: all)"})
    out: str | None = field(
        default=None, metadata={"help": "results JSON; predictions go to <stem>.predictions.jsonl"}
    )
    num_beams: int = field(default=4, metadata={"help": "beam width for generate scoring"})
    max_new_tokens: int = field(default=32, metadata={"help": "most tokens generated per answer"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    resume: bool = field(
        default=True,
        metadata={
            "help": "keep the predictions a stopped run with the same arguments left in <stem>.partial.jsonl"
        },
    )
    overflow: Overflow = field(
        default="error",
        metadata={
            "help": "a prompt and its answer longer than the model's context: error (name the record), "
            "truncate (cut prompt content) or skip (leave it out); counted per task in the results"
        },
    )
    causal_sink: bool | None = field(default=None, metadata={"help": CAUSAL_SINK_HELP_RUN})
    template: InstructionTemplate | None = field(
        default=None,
        metadata={"help": f"{TEMPLATE_HELP} (default: as the model was trained, else alpaca)"},
    )
    extract: commonsense.Extractor = field(
        default="strict",
        metadata={
            "help": "how generate scoring reads the label: strict (whole word, any case) or official "
            "(the paper's: first match, case-sensitive, no word boundary)"
        },
    )

    def __post_init__(self) -> None:
        check_policy(self.policy)
        if self.template is not None:
            check_template(self.template)
        if self.extract not in commonsense.EXTRACTORS:
            raise ValueError(
                f"unknown extractor {self.extract!r}; expected one of {', '.join(commonsense.EXTRACTORS)}"
            )
        if self.scoring == "loglik" and self.template not in (None, "alpaca"):
            raise ValueError(
                f"loglik scoring needs template alpaca, got {self.template!r}: the paper's evaluation prompt is "
                "no prefix of its training text; use scoring generate"
            )
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {self.scoring!r}; expected one of {', '.join(SCORINGS)}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, got {self.limit}")
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"unknown overflow {self.overflow!r}; expected one of {', '.join(OVERFLOWS)}")
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.causal_sink is not None and not isinstance(self.causal_sink, bool):
            raise ValueError(f"causal_sink must be true, false or None, got {self.causal_sink!r}")
        object.__setattr__(self, "data_dir", str(self.data_dir))
        object.__setattr__(self, "tasks", tuple(commonsense.parse_tasks(self.tasks)))
        if self.out is not None:
            object.__setattr__(self, "out", str(self.out))
            results.check_out(self.out, probe=False)  # a folder, or below a file: before any model loads


def evaluate(
    model: nn.Module, tokenizer, config: EvalConfig, *, model_name: str | None = None, progress: bool = True
) -> dict:
    """Evaluate ``model`` as ``config`` says and return the results (written to ``config.out`` when given).

    Every task file is read and validated before the model runs, so a bad file fails fast. The results hold
    per-task ``accuracy``, ``ci_low``/``ci_high`` (95% Wilson), ``n``, ``correct``, ``unparseable``; the
    unweighted ``average``; ``model`` (``model_name``, else the model's own name), ``policy``, ``scoring``,
    ``limit``, ``overflow``, ``causal_sink`` (``None`` counts as off), ``template`` (``None`` counts as
    ``alpaca``), ``extract`` (``generate`` scoring only) and the git ``commit``. With ``out``, predictions go to ``<out stem>.predictions.jsonl`` next
    to it.

    With ``out``, every prediction is also appended to ``<out stem>.partial.jsonl`` as soon as it is made,
    and the file is removed when the run finishes; a stopped run started again with the same config
    (``resume=True``) keeps those predictions and scores only the rest. A partial file written by another
    config is an error, never mixed in; ``resume=False`` discards it.
    """
    if config.out is not None:
        results.check_out(config.out)
    loaded = [commonsense.load_task(config.data_dir, name, config.limit) for name in config.tasks]
    name = model_name or str(getattr(model.config, "_name_or_path", "")) or type(model).__name__
    journal = _journal(config, name, loaded) if config.out is not None else None
    try:
        predictions = _predict_tasks(model, tokenizer, loaded, config, progress, journal)
        counts = overflow_counts(loaded, predictions, context_length(model))
    except BaseException:
        if journal is not None:
            journal.close()
        raise
    run = {"model": name, "policy": config.policy, "scoring": config.scoring, "limit": config.limit}
    run["overflow"] = config.overflow
    run["causal_sink"] = bool(config.causal_sink)
    run["template"] = config.template or DEFAULT_TEMPLATE
    if config.scoring == "generate":
        run["extract"] = config.extract
    report = results.run_results(predictions, run, {task.name: str(task.path) for task in loaded})
    for task_name, count in counts.items():
        report["tasks"][task_name] |= count
    if config.scoring == "generate":
        report["generation"] = {"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens}
    if journal is not None:
        report["predictions"] = results.write_results(report, predictions, config.out).name
        journal.finish()
    return report


def _journal(config: EvalConfig, model_name: str, loaded: Sequence[commonsense.Task]) -> results.Journal:
    """The run's journal; its header holds every setting that changes a prediction."""
    header = {"model": model_name, "tasks": list(config.tasks), "policy": config.policy}
    header |= {"scoring": config.scoring, "limit": config.limit}
    if config.causal_sink:  # only when on: a journal written before the option resumes as off
        header["causal_sink"] = True
    if (config.template or DEFAULT_TEMPLATE) != DEFAULT_TEMPLATE:  # likewise: an older journal is alpaca
        header["template"] = config.template
    if config.scoring == "generate" and config.extract != "strict":  # and strict
        header["extract"] = config.extract
    if config.scoring == "generate":  # decoding settings do not change loglik predictions
        header |= {key: getattr(config, key) for key in ("num_beams", "max_new_tokens", "batch_size")}
    header["files"] = [str(task.path.resolve()) for task in loaded]
    return results.Journal(results.journal_path(config.out), header, config.resume)


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    data_dir: str | Path,
    tasks: str | Sequence[str],
    policy: str = "mas",
    scoring: str = "generate",
    limit: int | None = None,
    out: str | Path | None = None,
    *,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    model_name: str | None = None,
    progress: bool = True,
    resume: bool = True,
) -> dict:
    """Deprecated: ``evaluate(model, tokenizer, EvalConfig(data_dir, tasks, ...))``, the same run."""
    warnings.warn(
        "segmask.evaluate_tasks is deprecated; use segmask.evaluate(model, tokenizer, EvalConfig(...))",
        DeprecationWarning,
        stacklevel=2,
    )
    config = EvalConfig(
        data_dir, tasks, policy, scoring, limit, out, num_beams, max_new_tokens, batch_size, resume
    )
    return evaluate(model, tokenizer, config, model_name=model_name, progress=progress)


def _predict_tasks(
    model: nn.Module,
    tokenizer,
    loaded: Sequence[commonsense.Task],
    config: EvalConfig,
    progress: bool,
    journal: results.Journal | None,
) -> list[results.Prediction]:
    """Every task's predictions, keeping those ``journal`` already holds and recording the new ones."""
    enable(model)
    model.eval()
    sink = bool(config.causal_sink)
    predictions: list[results.Prediction] = []
    for task in loaded:
        done = journal.done_for(task.name, [r["answer"] for r in task.records]) if journal else None
        done = resumable(done, config.overflow)
        record = journal.add if journal else None
        if config.scoring == "loglik":
            predictions += loglik_predictions(
                model, tokenizer, task, config.policy, progress, done, record, config.overflow, sink
            )  # template: alpaca (EvalConfig refuses loglik with another)
        else:
            predictions += generate_predictions(
                model,
                tokenizer,
                task,
                config.policy,
                config.num_beams,
                config.max_new_tokens,
                config.batch_size,
                progress,
                done,
                record,
                config.overflow,
                sink,
                config.template or DEFAULT_TEMPLATE,
                config.extract,
            )
    return predictions


def mas_prefill(
    model: nn.Module, input_ids: Sequence[int], segment_ids: Sequence[int]
) -> tuple[torch.Tensor, Any]:
    """Deprecated: :func:`segmask.generation.prefill` with ``logits_to_keep=1``. Next-token logits ``[1, V]``
    of one prompt under its segments, and the KV cache."""
    warnings.warn(
        "segmask.evaluation.mas_prefill is deprecated; use segmask.generation.prefill(..., logits_to_keep=1)",
        DeprecationWarning,
        stacklevel=2,
    )
    ids, segments = (torch.tensor([list(values)], dtype=torch.long) for values in (input_ids, segment_ids))
    logits, cache = prefill(model, ids, segments, logits_to_keep=1)
    return logits[:, -1], cache


# names that moved to segmask.results and segmask.tasks.commonsense: the old import path works, with a warning, for one release
_MOVED = dict.fromkeys(
    ("TASK_LABELS", "SUITE", "ANSWER_PREFIX", "Task", "task_path", "available_tasks", "parse_tasks", "load_task",
     "check_record", "record_candidates", "extract_answer", "answer_continuation"),
    "tasks.commonsense",
) | dict.fromkeys(
    ("Z_95", "wilson_interval", "Prediction", "TaskScore", "score_predictions", "average_accuracy",
     "journal_path", "Journal", "predictions_path", "write_results", "git_commit"),
    "results",
)  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"segmask.evaluation.{name} moved to segmask.{_MOVED[name]}.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f"segmask.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'segmask.evaluation' has no attribute {name!r}")
