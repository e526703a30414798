"""A prompt longer than the model's context, at evaluation: the ``overflow`` policy and its counts.

An evaluated prompt and the tokens of its answer must fit the model's positions (``max_position_embeddings``).
:func:`fit_prompt` applies the policy to one prompt: ``error`` refuses it, naming the record; ``truncate``
cuts prompt content from the start of its longest turn until it fits (as training's
:func:`segmask.segments.truncate_prompt`); ``skip`` leaves the record out. :func:`overflow_counts` gives
each task's ``truncated`` and ``skipped`` records for the results, and refuses a task left with none;
:func:`resumable` which of a stopped run's predictions a resumed run keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, get_args

from torch import nn

from segmask.segments import Encoded, truncate_prompt

if TYPE_CHECKING:  # read only: a task's name and records, a prediction's task and truncation
    from segmask.results import Prediction
    from segmask.tasks.commonsense import Task

Overflow = Literal["error", "truncate", "skip"]
OVERFLOWS: tuple[str, ...] = get_args(Overflow)


def context_length(model: nn.Module) -> int | None:
    """The positions the model was trained for (``max_position_embeddings``), or ``None`` when unknown."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "max_position_embeddings", 0) or 0) or None


def fit_prompt(
    prompt: Encoded, room: int, context: int | None, overflow: Overflow, name: str
) -> Encoded | None:
    """``prompt`` if it and ``room`` answer tokens fit ``context`` positions; otherwise, by ``overflow``, a
    ``ValueError`` naming the record ``name`` and the lengths (``error``), the prompt cut to fit
    (``truncate``: :func:`segmask.segments.truncate_prompt`, template and segments kept) or ``None`` (``skip``).
    """
    if context is None or len(prompt) + room <= context:
        return prompt
    if overflow == "skip":
        return None
    if overflow == "truncate":
        try:
            return truncate_prompt(prompt, context - room)
        except ValueError as error:
            raise ValueError(
                f"{name}: cannot truncate to the model's context of {context}: {error}"
            ) from None
    raise ValueError(
        f"{name}: its prompt of {len(prompt)} tokens and {room} answer tokens exceed the model's context of "
        f"{context} positions; choose overflow 'truncate' or 'skip' (segmask eval --overflow)"
    )


def overflow_counts(
    tasks: Sequence[Task], predictions: Sequence[Prediction], context: int | None
) -> dict[str, dict[str, int]]:
    """Task name -> its ``truncated`` and ``skipped`` records (a skipped record has no prediction); a
    ``ValueError`` when every record of a task was skipped, as longer than ``context`` positions."""
    counts = {task.name: {"truncated": 0, "skipped": len(task.records)} for task in tasks}
    for prediction in predictions:
        counts[prediction.task]["skipped"] -= 1
        counts[prediction.task]["truncated"] += prediction.truncated > 0
    for task in tasks:
        if counts[task.name]["skipped"] == len(task.records):
            raise ValueError(
                f"every record of {task.name} is longer than the model's context "
                f"({context} positions); nothing to score"
            )
    return counts


def resumable(done: Mapping[int, Prediction] | None, overflow: Overflow) -> Mapping[int, Prediction] | None:
    """The predictions of a stopped run (record index -> prediction) that a run under ``overflow`` keeps: a
    truncated prediction stands only under ``truncate``."""
    if done and overflow != "truncate":
        return {index: p for index, p in done.items() if not p.truncated}
    return done
