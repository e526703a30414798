"""Evaluate a model on the commonsense suite (LLM-Adapters format), MAS against causal.

    segmask eval --model ../shared/models/stories260K --data-dir ../shared/data/commonsense \\
        --tasks boolq,ARC-Easy --limit 20 --scoring loglik --mask mas --out runs/stories-mas.json

A task is a JSON list of records ``{"instruction", "input", "output", "answer"}`` in ``DIR/<task>_test.json``
or ``DIR/<task>/test.json``; ``answer`` is a label of the task's answer vocabulary (``true``/``false``,
``answer1``..``answer5``, ...). Two ways to score a record:

    generate   the paper's protocol: the instruction template, beam search (4 beams, at most 32 new tokens,
               greedy as an option) after a MAS prefill of the prompt; the prediction is the first label of
               the task's vocabulary found in the generated text (none found: unparseable, counted wrong).
    loglik     the prompt is prefilled once under its mask policy; every candidate answer, the training
               target ``"the correct answer is <label>"`` with its EOS, is then scored causally against that
               KV cache and the candidate with the highest summed log-probability is the prediction.

Accuracy comes with a 95% Wilson interval; the suite's score is the unweighted mean over tasks. Each run
writes ``results.json`` and ``results.predictions.jsonl`` (one line per record, for audit and for the paired
tests of :mod:`segmask.compare`).
"""

from __future__ import annotations

import importlib
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn
from tqdm.auto import tqdm

from segmask import compat, results
from segmask.attention import enable
from segmask.generation import generate
from segmask.masks import check_policy
from segmask.segments import Encoded, encode_instruction

Scoring = Literal["generate", "loglik"]
SCORINGS: tuple[str, ...] = get_args(Scoring)

# the answer vocabulary of each task of the suite (LLM-Adapters' label strings)
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}
SUITE: tuple[str, ...] = tuple(TASK_LABELS)
ANSWER_PREFIX = "the correct answer is "  # the training target is ANSWER_PREFIX + label

_FORMAT_LINE = re.compile(r"Answer format:\s*(\S+)")


# --------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """One task: its records and answer vocabulary. ``candidates[i]`` are the labels record ``i`` offers."""

    name: str
    path: Path
    records: tuple[dict, ...]
    labels: tuple[str, ...]
    candidates: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not self.records:
            raise ValueError(f"{self.path}: task {self.name!r} has no records")
        if len(self.candidates) != len(self.records):
            raise ValueError(
                f"{self.path}: {len(self.candidates)} candidate lists for {len(self.records)} records"
            )


def task_path(data_dir: str | Path, name: str) -> Path:
    """``DIR/<name>_test.json`` or ``DIR/<name>/test.json``; a ``FileNotFoundError`` lists what exists."""
    data_dir = Path(data_dir)
    for path in (data_dir / f"{name}_test.json", data_dir / name / "test.json"):
        if path.is_file():
            return path
    found = ", ".join(available_tasks(data_dir)) if data_dir.is_dir() else f"{data_dir} is not a directory"
    raise FileNotFoundError(
        f"no test file for task {name!r}: looked for {data_dir / f'{name}_test.json'} and "
        f"{data_dir / name / 'test.json'} (available: {found or 'none'})"
    )


def available_tasks(data_dir: str | Path) -> list[str]:
    """Names of the tasks with a test file in ``data_dir``."""
    data_dir = Path(data_dir)
    names = [p.name.removesuffix("_test.json") for p in data_dir.glob("*_test.json")]
    names += [p.parent.name for p in data_dir.glob("*/test.json")]
    return sorted(set(names))


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"boolq,piqa"`` or ``["boolq", "piqa"]`` to a list of unique names, in order."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError("no tasks given")
    return list(dict.fromkeys(names))


def load_task(data_dir: str | Path, name: str, limit: int | None = None) -> Task:
    """Read and validate a task's first ``limit`` records (all when ``None``).

    Raises a ``ValueError`` naming the file and the record index for a malformed record or an answer outside
    the task's vocabulary, and a ``FileNotFoundError`` for a missing file.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    path = task_path(data_dir, name)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for index, record in enumerate(records):
        check_record(record, path, index)
    labels = TASK_LABELS.get(name) or _labels_from_records(records)
    records = records[:limit]
    candidates = tuple(record_candidates(record, labels, path, index) for index, record in enumerate(records))
    return Task(name, path, tuple(records), labels, candidates)


def check_record(record: Any, path: Path, index: int) -> None:
    """Raise a ``ValueError`` naming ``path`` and ``index`` unless ``record`` is an LLM-Adapters record."""
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    for key in ("instruction", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"{where}: missing or empty string field {key!r}")
    for key in ("input", "output"):
        if not isinstance(record.get(key, ""), str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")


def record_candidates(record: dict, labels: tuple[str, ...], path: Path, index: int) -> tuple[str, ...]:
    """The labels a record offers: its ``Answer format: a/b/c`` line, else the task's whole vocabulary.

    ARC questions have 3 to 5 options; scoring only the offered ones keeps ``loglik`` from choosing an
    option that does not exist.
    """
    where = f"{path}: record {index}"
    found = _FORMAT_LINE.findall(record["instruction"])
    offered = tuple(found[-1].split("/")) if found else labels
    unknown = [label for label in offered if label not in labels]
    if unknown:
        raise ValueError(f"{where}: answer format lists {unknown}, not in the task's labels {list(labels)}")
    if record["answer"] not in offered:
        raise ValueError(f"{where}: answer {record['answer']!r} is not one of {list(offered)}")
    return offered


def _labels_from_records(records: list[dict]) -> tuple[str, ...]:
    """Vocabulary of a task outside the suite: every label named in an answer-format line or as an answer."""
    labels: dict[str, None] = {}
    for record in records:
        for line in _FORMAT_LINE.findall(record["instruction"]):
            labels.update(dict.fromkeys(line.split("/")))
        labels[record["answer"]] = None
    return tuple(labels)


def extract_answer(text: str, labels: Sequence[str]) -> str | None:
    """The first label of ``labels`` that occurs in ``text`` as a whole word, case-insensitive, else ``None``.

    ``"The correct answer is Answer2."`` gives ``"answer2"``; ``"answer1 or answer3"`` gives ``"answer1"``;
    ``"untrue"`` contains no ``"true"``.
    """
    if not labels:
        raise ValueError("extract_answer needs at least one label")
    by_lower = {label.lower(): label for label in labels}
    alternatives = "|".join(re.escape(label) for label in sorted(by_lower, key=len, reverse=True))
    match = re.search(rf"(?<![0-9a-z_])({alternatives})(?![0-9a-z_])", text.lower())
    return None if match is None else by_lower[match.group(1)]


# -------------------------------------------------------------------------------------------- loglik


@dataclass(frozen=True)
class ContinuationScore:
    """Summed log-probability of a continuation and whether greedy decoding would produce it."""

    logprob: float
    is_greedy: bool


def mas_prefill(
    model: nn.Module, input_ids: Sequence[int], segment_ids: Sequence[int]
) -> tuple[torch.Tensor, Any]:
    """Run one prompt through ``model`` under its segments: next-token logits ``[1, V]`` and the KV cache."""
    if len(input_ids) != len(segment_ids):
        raise ValueError(f"{len(input_ids)} prompt tokens but {len(segment_ids)} segment ids")
    if not input_ids:
        raise ValueError("empty prompt: nothing to condition on")
    device = model.device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    segments = torch.tensor([list(segment_ids)], dtype=torch.long, device=device)
    out = model(input_ids=ids, segment_ids=segments, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], compat.output_cache(out)


@torch.inference_mode()
def continuation_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[int],
    segment_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
) -> list[ContinuationScore]:
    """Score several causal continuations of one prompt, prefilling the prompt once.

    The prompt (``P`` tokens, under ``segment_ids``, e.g. MAS segments) is prefilled into a KV cache; the
    cache is then repeated for the ``C`` continuations, which run as one right-padded causal batch
    ``[C, W]``. Token ``k`` of a continuation is predicted by the prompt's last logits (``k = 0``) or by the
    continuation's own position ``k - 1``. ``model`` must have gone through :func:`segmask.enable`.
    """
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    last, cache = mas_prefill(model, prompt_ids, segment_ids)
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


def answer_continuation(tokenizer, record: dict, label: str, policy: str, prompt: Encoded) -> list[int]:
    """Token ids of ``ANSWER_PREFIX + label`` after ``prompt``, exactly as training would see them."""
    full = encode_instruction(
        tokenizer,
        {**record, "output": ANSWER_PREFIX + label, "answer": label},
        policy=policy,
        include_answer=True,
    )
    cut = len(prompt.input_ids)
    if full.input_ids[:cut] != prompt.input_ids:
        raise ValueError("the prompt's tokens are not a prefix of the prompt-plus-answer tokens")
    if any(segment != -1 for segment in full.segment_ids[cut:]):
        raise ValueError("answer tokens must be causal (segment id -1)")
    return full.input_ids[cut:]


def loglik_predictions(
    model: nn.Module,
    tokenizer,
    task: Task,
    policy: str,
    progress: bool = True,
    done: Mapping[int, results.Prediction] | None = None,
    on_prediction: Callable[[results.Prediction], None] | None = None,
) -> list[results.Prediction]:
    """Predict each record of ``task`` by the highest-scoring candidate answer (see the module docstring).

    Records whose index is in ``done`` keep that prediction (a resumed run); ``on_prediction`` sees each new
    one as soon as it is made.
    """
    done = done or {}
    predictions = []
    for index, (record, labels) in enumerate(
        tqdm(
            list(zip(task.records, task.candidates)),
            desc=f"{task.name} (loglik)",
            disable=not progress,
        )
    ):
        if index in done:
            predictions.append(done[index])
            continue
        prompt = encode_instruction(tokenizer, record, policy=policy, include_answer=False)
        continuations = [answer_continuation(tokenizer, record, label, policy, prompt) for label in labels]
        scores = continuation_logprobs(model, prompt.input_ids, prompt.segment_ids, continuations)
        by_label = {label: score.logprob for label, score in zip(labels, scores)}
        best = max(by_label, key=by_label.__getitem__)
        predictions.append(
            results.Prediction(
                task=task.name,
                index=index,
                prompt=tokenizer.decode(prompt.input_ids),
                output=ANSWER_PREFIX + best,
                prediction=best,
                gold=record["answer"],
                scores=by_label,
            )
        )
        if on_prediction is not None:
            on_prediction(predictions[-1])
    return predictions


# ------------------------------------------------------------------------------------------ generate


def generate_predictions(
    model: nn.Module,
    tokenizer,
    task: Task,
    policy: str,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
    done: Mapping[int, results.Prediction] | None = None,
    on_prediction: Callable[[results.Prediction], None] | None = None,
) -> list[results.Prediction]:
    """The paper's protocol: MAS prefill, beam search, the first label found in the generated text.

    ``done`` and ``on_prediction`` as in :func:`loglik_predictions`.
    """
    done = done or {}
    by_index = dict(done)
    todo = [index for index in range(len(task.records)) if index not in done]
    bar = tqdm(
        total=len(task.records), initial=len(task.records) - len(todo), desc=f"{task.name} (generate)",
        disable=not progress,
    )  # fmt: skip
    for start in range(0, len(todo), batch_size):
        indices = todo[start : start + batch_size]
        records = [task.records[index] for index in indices]
        completions = generate(
            model,
            tokenizer,
            records,
            policy,
            num_beams=num_beams,
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
        for index, record, completion in zip(indices, records, completions):
            prompt = encode_instruction(tokenizer, record, policy=policy, include_answer=False)
            by_index[index] = results.Prediction(
                task=task.name,
                index=index,
                prompt=tokenizer.decode(prompt.input_ids),
                output=completion.text,
                prediction=extract_answer(completion.text, task.labels),
                gold=record["answer"],
            )
            if on_prediction is not None:
                on_prediction(by_index[index])
        bar.update(len(records))
    bar.close()
    return [by_index[index] for index in range(len(task.records))]


# ---------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class EvalConfig:
    """How a run scores records; validated on construction."""

    policy: str = "mas"
    scoring: str = "generate"
    limit: int | None = None
    num_beams: int = 4
    max_new_tokens: int = 32
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_policy(self.policy)
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {self.scoring!r}; expected one of {', '.join(SCORINGS)}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, got {self.limit}")
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


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
    """Evaluate ``model`` on ``tasks`` and return the results (written to ``out`` when given).

    ``limit`` takes the first N records of each task, so runs with the same limit share their records.
    Every task file is read and validated before the model runs, so a bad file fails fast. The results hold
    per-task ``accuracy``, ``ci_low``/``ci_high`` (95% Wilson), ``n``, ``correct``, ``unparseable``; the
    unweighted ``average``; ``model``, ``policy``, ``scoring``, ``limit`` and the git ``commit``. With
    ``out``, predictions go to ``<out stem>.predictions.jsonl`` next to it.

    With ``out``, every prediction is also appended to ``<out stem>.partial.jsonl`` as soon as it is made,
    and the file is removed when the run finishes; a stopped run started again with the same arguments
    (``resume=True``) keeps those predictions and scores only the rest. A partial file written by other
    arguments is an error, never mixed in; ``resume=False`` discards it.
    """
    config = EvalConfig(policy, scoring, limit, num_beams, max_new_tokens, batch_size)
    names = parse_tasks(tasks)
    loaded = [load_task(data_dir, name, config.limit) for name in names]
    name = model_name or str(getattr(model.config, "_name_or_path", "")) or type(model).__name__
    journal = None
    if out is not None:
        header = {"model": name, "tasks": names, **asdict(config)}
        header["files"] = [str(task.path.resolve()) for task in loaded]
        if config.scoring == "loglik":  # decoding settings do not change loglik predictions
            for key in ("num_beams", "max_new_tokens", "batch_size"):
                header.pop(key)
        journal = results.Journal(results.journal_path(out), header, resume)
    try:
        predictions = _predict_tasks(model, tokenizer, loaded, config, progress, journal)
    except BaseException:
        if journal is not None:
            journal.close()
        raise
    run = {"model": name, "policy": config.policy, "scoring": config.scoring, "limit": config.limit}
    report = results.run_results(predictions, run, {task.name: str(task.path) for task in loaded})
    if config.scoring == "generate":
        report["generation"] = {"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens}
    if out is not None:
        report["predictions"] = results.write_results(report, predictions, out).name
        journal.finish()
    return report


def _predict_tasks(
    model: nn.Module,
    tokenizer,
    loaded: Sequence,
    config: EvalConfig,
    progress: bool,
    journal: results.Journal | None,
) -> list[results.Prediction]:
    """Every task's predictions, keeping those ``journal`` already holds and recording the new ones."""
    enable(model)
    model.eval()
    predictions: list[results.Prediction] = []
    for task in loaded:
        done = journal.done_for(task.name, [r["answer"] for r in task.records]) if journal else None
        record = journal.add if journal else None
        if config.scoring == "loglik":
            predictions += loglik_predictions(model, tokenizer, task, config.policy, progress, done, record)
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
            )
    return predictions


# names that moved to segmask.results: the old import path works, with a warning, for one release
_MOVED = {
    name: "results"
    for name in (
        "Z_95",
        "wilson_interval",
        "Prediction",
        "TaskScore",
        "score_predictions",
        "average_accuracy",
        "journal_path",
        "Journal",
        "predictions_path",
        "write_results",
        "git_commit",
    )
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"segmask.evaluation.{name} moved to segmask.{_MOVED[name]}.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f"segmask.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'segmask.evaluation' has no attribute {name!r}")
