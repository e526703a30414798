"""EvalConfig (frozen): one evaluation run of the commonsense suite, validated on construction.

Light on purpose (no torch): ``segmask eval --help`` shows its fields without loading a model library.
:func:`segmask.evaluation.evaluate` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from segmask import results
from segmask.overflow import OVERFLOWS, Overflow
from segmask.policies import CAUSAL_SINK_HELP_RUN, check_policy, sink_on
from segmask.tasks import commonsense
from segmask.templates import TEMPLATE_HELP, InstructionTemplate, check_template

Scoring = Literal["generate", "loglik"]
SCORINGS: tuple[str, ...] = get_args(Scoring)


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run of the commonsense suite; validated on construction.

    ``tasks`` takes ``"boolq,piqa"`` or a list (kept as a tuple of unique names, in order); ``limit`` the
    first N distinct records of each task (a repeated record counts once:
    :func:`segmask.tasks.commonsense.load_task`), so runs with the same limit share their records. With
    ``out`` the results go to that JSON file, the predictions beside it, and an unfinished run's predictions
    to a journal that ``resume`` picks up (see :func:`evaluate`). ``num_beams``, ``max_new_tokens`` and ``batch_size`` are the
    decoding settings of ``generate`` scoring. ``causal_sink`` keeps each prompt's token 0 causal under
    ``mas``/``prefix``; ``None`` becomes the policy's default on construction
    (:func:`segmask.policies.sink_on`: on under ``mas``), as in :class:`segmask.TrainConfig`, and ``segmask
    eval`` passes the run's saved value (:func:`segmask.runs.resolve_settings`). ``template`` is the
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
    limit: int | None = field(
        default=None, metadata={"help": "first N distinct records of each task (default: all)"}
    )
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
        # None is the policy's default (a ValueError for anything but a bool or None)
        object.__setattr__(self, "causal_sink", sink_on(self.policy, self.causal_sink))
        object.__setattr__(self, "data_dir", str(self.data_dir))
        object.__setattr__(self, "tasks", tuple(commonsense.parse_tasks(self.tasks)))
        if self.out is not None:
            object.__setattr__(self, "out", str(self.out))
            results.check_out(self.out, probe=False)  # a folder, or below a file: before any model loads
