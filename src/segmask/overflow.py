"""A sequence longer than its limit: the ``overflow`` policy, one vocabulary for training and evaluation.

    error      refuse it: a ValueError naming the record and the lengths (evaluation's default; encoding's)
    skip       leave the record out (training's default: ``segmask train``'s ``overflow: skip``)
    truncate   cut prompt content from the start of its longest turn until it fits; template tokens, the
               sink and answers are never cut (:func:`truncate_prompt`)

At encoding and in training the limit is a ``cutoff`` in tokens: :func:`apply_cutoff` (one record) and
:func:`apply_cutoff_all` (a batch, with a :class:`CutoffReport` of what each choice touches). At evaluation it
is the model's context: :func:`fit_prompt` fits one prompt and the tokens of its answer into it,
:func:`overflow_counts` gives each task's ``truncated`` and ``skipped`` records for the results (and refuses a
task left with none), :func:`resumable` which of a stopped run's predictions a resumed run keeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:  # read only: segments imports this module to cut what it encodes
    from torch import nn

    from segmask.results import Prediction
    from segmask.segments import Encoded
    from segmask.tasks.commonsense import Task

Overflow = Literal["error", "truncate", "skip"]
OVERFLOWS: tuple[str, ...] = get_args(Overflow)


# -------------------------------------------------------------------------------- a cutoff in tokens


def _check_cutoff(cutoff: int, overflow: str) -> None:
    if not isinstance(cutoff, int) or cutoff <= 0:
        raise ValueError(f"cutoff must be a positive number of tokens, got {cutoff!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"unknown overflow policy {overflow!r}; expected one of {', '.join(OVERFLOWS)}")


def _trimmable(encoded: Encoded) -> int:
    return sum(turn >= 0 for turn in encoded.prompt_turns)


def truncate_prompt(encoded: Encoded, cutoff: int) -> Encoded:
    """Cut prompt content, always from the start of the currently longest prompt turn, until ``cutoff`` fits
    (``truncate``).

    Template tokens (role headers, end-of-turn) and answers are never cut; a ``ValueError`` if they alone
    exceed ``cutoff``. The longest turn is cut down to the next longest before that one is cut too.
    """
    excess = len(encoded) - cutoff
    if excess <= 0:
        return encoded
    if not encoded.prompt_turns:
        raise ValueError("truncating needs prompt_turns (encode with encode_chat or encode_instruction)")
    if _trimmable(encoded) < excess:
        raise ValueError(
            f"{len(encoded)} tokens exceed cutoff {cutoff} and only {_trimmable(encoded)} are prompt content: "
            "the answer and the template alone do not fit"
        )
    sizes: dict[int, int] = {}
    for turn in encoded.prompt_turns:
        if turn >= 0:
            sizes[turn] = sizes.get(turn, 0) + 1
    cut = dict.fromkeys(sizes, 0)
    while excess > 0:
        ranked = sorted(sizes, key=lambda t: (-(sizes[t] - cut[t]), t))
        longest = ranked[0]
        second = sizes[ranked[1]] - cut[ranked[1]] if len(ranked) > 1 else 0
        step = min(excess, max(1, sizes[longest] - cut[longest] - second))
        cut[longest] += step
        excess -= step
    keep, seen = [], dict.fromkeys(sizes, 0)
    for position, turn in enumerate(encoded.prompt_turns):
        if turn >= 0:
            seen[turn] += 1
            if seen[turn] <= cut[turn]:
                continue
        keep.append(position)
    names = [field.name for field in dataclasses.fields(encoded)]
    return type(encoded)(*([getattr(encoded, name)[p] for p in keep] for name in names))


def apply_cutoff(encoded: Encoded, cutoff: int | None, overflow: Overflow = "error") -> Encoded | None:
    """``encoded`` if it fits ``cutoff`` tokens; otherwise a ``ValueError`` (``error``), ``None`` (``skip``),
    or the prompt cut to fit (``truncate``: :func:`truncate_prompt`). ``cutoff=None`` means no limit."""
    if cutoff is None:
        return encoded
    _check_cutoff(cutoff, overflow)
    if len(encoded) <= cutoff:
        return encoded
    if overflow == "skip":
        return None
    if overflow == "truncate":
        return truncate_prompt(encoded, cutoff)
    raise ValueError(
        f"{len(encoded)} tokens exceed cutoff {cutoff}; pass overflow='skip' or 'truncate' to allow it"
    )


@dataclass(frozen=True)
class CutoffReport:
    """How a cutoff touches a batch: ``over`` records exceed it, ``unfittable`` of those cannot be fitted by
    cutting prompt content. ``error`` fails on ``over`` records, ``skip`` leaves them out, ``truncate``
    truncates ``over - unfittable`` and fails on the rest."""

    cutoff: int
    records: int
    over: int
    unfittable: int

    def __str__(self) -> str:
        return (
            f"{self.over} of {self.records} records exceed cutoff {self.cutoff}: error fails on {self.over}, "
            f"skip leaves out {self.over}, truncate truncates {self.over - self.unfittable}"
            + (f" and fails on {self.unfittable}" if self.unfittable else "")
        )


def cutoff_report(encoded: Sequence[Encoded], cutoff: int) -> CutoffReport:
    """Count the records over ``cutoff`` and those that prompt truncation cannot fit."""
    _check_cutoff(cutoff, "error")
    over = [e for e in encoded if len(e) > cutoff]
    unfittable = sum(len(e) - _trimmable(e) > cutoff for e in over)
    return CutoffReport(cutoff, len(encoded), len(over), unfittable)


def apply_cutoff_all(
    encoded: Sequence[Encoded], cutoff: int, overflow: Overflow = "error"
) -> tuple[list[Encoded], CutoffReport]:
    """Apply ``overflow`` to every record; the kept records and the :class:`CutoffReport`.

    ``error`` (and ``truncate`` with unfittable records) raises a ``ValueError`` quoting the report and the
    first offending record before changing anything.
    """
    _check_cutoff(cutoff, overflow)
    report = cutoff_report(encoded, cutoff)
    if overflow == "error" and report.over:
        first = next(i for i, e in enumerate(encoded) if len(e) > cutoff)
        raise ValueError(f"{report} (first: record {first}, {len(encoded[first])} tokens)")
    if overflow == "truncate" and report.unfittable:
        first = next(i for i, e in enumerate(encoded) if len(e) - _trimmable(e) > cutoff)
        raise ValueError(f"{report} (first unfittable: record {first}, {len(encoded[first])} tokens)")
    kept = [fitted for e in encoded if (fitted := apply_cutoff(e, cutoff, overflow)) is not None]
    return kept, report


# ------------------------------------------------------------------------------- the model's context


def context_length(model: nn.Module) -> int | None:
    """The positions the model was trained for (``max_position_embeddings``), or ``None`` when unknown."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "max_position_embeddings", 0) or 0) or None


def fit_prompt(
    prompt: Encoded, room: int, context: int | None, overflow: Overflow, name: str
) -> Encoded | None:
    """``prompt`` if it and ``room`` answer tokens fit ``context`` positions; otherwise, by ``overflow``, a
    ``ValueError`` naming the record ``name`` and the lengths (``error``), the prompt cut to fit
    (``truncate``: :func:`truncate_prompt`, template and segments kept) or ``None`` (``skip``).
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
