"""Evaluate a model on the commonsense suite under a mask policy: one :class:`EvalConfig`, one :func:`evaluate`.

    segmask eval --model ../shared/models/stories260K --data-dir ../shared/data/commonsense \\
        --tasks boolq,ARC-Easy --limit 20 --scoring loglik --mask mas --out runs/stories-mas.json

:func:`evaluate` reads and checks every task (:mod:`segmask.tasks.commonsense`) before the model runs, predicts
each record with :mod:`segmask.scoring` (``generate``, the paper's protocol, or ``loglik``, the candidate
answers' log-likelihood) and turns the predictions into scores and files with :mod:`segmask.results`. A
prompt whose answer would not fit the model's context follows the ``overflow`` policy of
:mod:`segmask.overflow` (refuse, truncate or skip); each task's counts are in the results.

Accuracy comes with a 95% Wilson interval; the suite's score is the unweighted mean over tasks. Each run
writes ``results.json`` and ``results.predictions.jsonl`` (one line per record, for audit and for the paired
tests of :mod:`segmask.compare`), and journals each prediction as it is made so that a stopped run resumes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from segmask import results, scoring
from segmask.eval_config import EvalConfig
from segmask.files import exclusive_lock
from segmask.hook import enable
from segmask.overflow import context_length, overflow_counts, resumable
from segmask.tasks import commonsense
from segmask.templates import DEFAULT_TEMPLATE

# ---------------------------------------------------------------------------------------------- runs


def evaluate(
    model: nn.Module, tokenizer, config: EvalConfig, *, model_name: str | None = None, progress: bool = True
) -> dict:
    """Evaluate ``model`` as ``config`` says and return the results (written to ``config.out`` when given).

    Every task file is read and validated before the model runs, so a bad file fails fast. The results hold
    per-task ``accuracy``, ``ci_low``/``ci_high`` (95% Wilson), ``n``, ``correct``, ``unparseable`` (and
    ``duplicates``, with a warning, where the task file repeats records: each is counted once, see
    :func:`segmask.tasks.commonsense.load_task`); the
    unweighted ``average``; ``model`` (``model_name``, else the model's own name), ``policy``, ``scoring``,
    ``limit``, ``overflow``, ``causal_sink``, ``template`` (``None`` counts as
    ``alpaca``), ``extract`` (``generate`` scoring only) and the git ``commit``. With ``out``, predictions go to ``<out stem>.predictions.jsonl`` next
    to it.

    With ``out``, every prediction is also appended to ``<out stem>.partial.jsonl`` as soon as it is made,
    and the file is removed when the run finishes; a stopped run started again with the same config
    (``resume=True``) keeps those predictions and scores only the rest. A partial file written by another
    config is an error, never mixed in; ``resume=False`` discards it. A second run on the same ``out`` while
    one runs is refused (``ValueError``), as ``segmask train`` refuses a second run on its output.
    """
    if config.out is None:
        return _evaluate(model, tokenizer, config, model_name, progress)
    results.check_out(config.out)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # two runs on one out would interleave their journal and overwrite each other's results: one at a time
    with exclusive_lock(out.with_name(out.stem + ".lock"), f"out {config.out}"):
        return _evaluate(model, tokenizer, config, model_name, progress)


def _evaluate(
    model: nn.Module, tokenizer, config: EvalConfig, model_name: str | None, progress: bool
) -> dict:
    loaded = [commonsense.load_task(config.data_dir, name, config.limit) for name in config.tasks]
    for task in loaded:
        if task.duplicates:
            warnings.warn(
                f"{task.path}: {task.duplicates} repeated records of {task.name} counted once "
                f"({len(task.records)} distinct records scored)",
                stacklevel=2,
            )
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
    run["causal_sink"] = config.causal_sink
    run["template"] = config.template or DEFAULT_TEMPLATE
    if config.scoring == "generate":
        run["extract"] = config.extract
    report = results.run_results(predictions, run, {task.name: str(task.path) for task in loaded})
    for task_name, count in counts.items():
        report["tasks"][task_name] |= count
    for task in loaded:
        if task.duplicates:
            report["tasks"][task.name]["duplicates"] = task.duplicates
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
    if config.causal_sink:  # only when on: an older journal resumes as off
        header["causal_sink"] = True
    if (config.template or DEFAULT_TEMPLATE) != DEFAULT_TEMPLATE:  # likewise: an older journal is alpaca
        header["template"] = config.template
    if config.scoring == "generate" and config.extract != "strict":  # and strict
        header["extract"] = config.extract
    if config.scoring == "generate":  # decoding settings do not change loglik predictions
        header |= {key: getattr(config, key) for key in ("num_beams", "max_new_tokens", "batch_size")}
    if any(task.duplicates for task in loaded):  # record indices count distinct records (since issue 31)
        header["distinct_records"] = True
    header["files"] = [str(task.path.resolve()) for task in loaded]
    return results.Journal(results.journal_path(config.out), header, config.resume)


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
    predictions: list[results.Prediction] = []
    for task in loaded:
        done = journal.done_for(task.name, [r["answer"] for r in task.records]) if journal else None
        done = resumable(done, config.overflow)
        record = journal.add if journal else None
        if config.scoring == "loglik":
            predictions += scoring.loglik_predictions(
                model,
                tokenizer,
                task,
                config.policy,
                progress,
                done,
                record,
                config.overflow,
                config.causal_sink,
            )  # template: alpaca (EvalConfig refuses loglik with another)
        else:
            predictions += scoring.generate_predictions(
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
                config.causal_sink,
                config.template or DEFAULT_TEMPLATE,
                config.extract,
            )
    return predictions
