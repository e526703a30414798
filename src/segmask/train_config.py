"""TrainConfig: everything a training run depends on, as one frozen dataclass checked on construction.

A YAML file is this dataclass serialised; CLI flags override it (``segmask train`` derives one flag per
field, its help from the field's metadata)::

    from segmask.train_config import TrainConfig
    config = TrainConfig.from_yaml("configs/cpu_smollm2.yaml", policy="mas", max_steps=100)

Values are coerced to the declared types, so YAML 1.1 strings (``2e-4``) and CLI strings read right. The run
itself is :func:`segmask.training.train`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from segmask import policies
from segmask.overflow import OVERFLOWS
from segmask.policies import CAUSAL_SINK_HELP, SUPPORTED, sink_on
from segmask.templates import TEMPLATE_HELP, check_template

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _help(text: str, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. A YAML file is this dataclass serialised; CLI flags override it.

    Values are coerced to the declared types (``"2e-4"`` -> ``2e-4``, a single path -> a 1-tuple) and checked
    on construction; a ``ValueError`` names the bad field. Defaults are the paper's LoRA recipe.
    """

    model: str = _help("base model: a local transformers folder or .gguf file", "")
    data: tuple[str, ...] = _help(
        "training files or folders (LLM-Adapters .json, chat .jsonl, datasets); globs ok", ()
    )
    output: str = _help("output folder (checkpoints, final weights, segmask.json, metrics)", "runs/train")
    policy: str = field(
        default="mas", metadata={"help": "mask policy: causal, mas or prefix", "flag": "--mask"}
    )
    causal_sink: bool | None = _help(CAUSAL_SINK_HELP, None)
    template: str = _help(f"{TEMPLATE_HELP}; for LLM-Adapters records", "alpaca")
    chat_template: str | None = _help(
        "Jinja chat template file (or the template itself, inline) for chat records, replacing the model's; "
        "lets a model without one train on chat data (default: the model's)",
        None,
    )
    # data
    cutoff_len: int = _help("most tokens per example (prompt + answer)", 256)
    overflow: str = _help(
        "a record over cutoff_len: skip (leave it out), truncate (cut prompt content; answers are never "
        "cut) or error",
        "skip",
    )
    eval_size: int = _help("records held out for the periodic eval loss (0: no eval)", 0)
    max_records: int | None = _help("use at most this many training records (after shuffling)", None)
    train_on_inputs: bool = _help("put the loss on prompt tokens too (causal policy only)", False)
    packing: bool = _help(
        "pack each batch's records into rows of cutoff_len tokens (document-aware mask)", False
    )
    group_by_length: bool = _help("batch records of similar length (seeded, resumable)", True)
    # optimisation
    epochs: float = _help("passes over the training records", 3.0)
    max_steps: int | None = _help("stop after this many optimiser steps (overrides epochs)", None)
    batch_size: int = _help("records per device per micro-batch", 4)
    gradient_accumulation_steps: int = _help("micro-batches per optimiser step", 4)
    learning_rate: float = _help("peak learning rate", 2e-4)
    lr_scheduler: str = _help("transformers scheduler name (linear, cosine, constant, ...)", "linear")
    warmup_steps: int = _help("linear warm-up steps", 100)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    max_grad_norm: float = _help("gradient clipping norm", 1.0)
    # LoRA (lora_r 0: full fine-tuning)
    lora_r: int = _help("LoRA rank; 0 trains all weights", 32)
    lora_alpha: int = _help("LoRA alpha", 64)
    lora_dropout: float = _help("LoRA dropout", 0.05)
    lora_target_modules: tuple[str, ...] = _help("modules that get LoRA adapters", ("q_proj", "v_proj"))
    # runtime
    attn_implementation: str = _help(f"attention backend: {', '.join(SUPPORTED)}", "sdpa")
    precision: str = _help("auto (bf16/fp16 where the GPU supports it), fp32, bf16 or fp16", "auto")
    gradient_checkpointing: bool = _help("recompute activations in the backward pass to save memory", False)
    seed: int = _help("seed for initialisation, dropout and the data order", 42)
    data_seed: int | None = _help("seed for the data split and order (default: seed)", None)
    logging_steps: int = _help("log the training loss every N steps", 10)
    eval_steps: int = _help("eval loss every N steps (with eval_size > 0)", 80)
    save_steps: int = _help("checkpoint every N steps", 80)
    save_total_limit: int | None = _help("keep at most this many checkpoints", 3)
    load_best_model_at_end: bool = _help(
        "end with the checkpoint of the lowest eval loss (needs eval_size > 0, save_steps a multiple of "
        "eval_steps)",
        False,
    )
    resume: bool = _help("continue from the last complete checkpoint in output", False)
    merge: bool = _help("also write the LoRA adapter merged into the base weights", False)
    overwrite: bool = _help("replace an existing run in output", False)

    def __post_init__(self) -> None:
        for name, kind in get_type_hints(TrainConfig).items():
            object.__setattr__(self, name, _coerce(name, getattr(self, name), kind))
        self._validate()
        # None is the policy's default; the config (and train_config.json, segmask.json) holds the value used
        object.__setattr__(self, "causal_sink", sink_on(self.policy, self.causal_sink))

    def _validate(self) -> None:
        if not self.model:
            raise ValueError("model is required (a local transformers folder or .gguf file)")
        if not self.data:
            raise ValueError("data is required: one or more training files")
        policies.check_policy(self.policy)
        positive = (
            "cutoff_len",
            "batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        for name in ("max_steps", "max_records", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive (or null), got {value}")
        for name in ("eval_size", "warmup_steps", "lora_r", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lora_r > 0:
            if self.lora_alpha <= 0:
                raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
            if not 0 <= self.lora_dropout < 1:
                raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
            if not self.lora_target_modules:
                raise ValueError(
                    "lora_target_modules is empty; name the modules to adapt (e.g. q_proj v_proj)"
                )
        elif self.merge:
            raise ValueError(
                "merge needs a LoRA adapter (lora_r > 0); full fine-tuning already writes full weights"
            )
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOWS)}, got {self.overflow!r}")
        check_template(self.template)
        if self.load_best_model_at_end:
            if self.eval_size == 0:
                raise ValueError("load_best_model_at_end needs an eval split: set eval_size > 0")
            if self.save_steps % self.eval_steps:
                raise ValueError(
                    f"load_best_model_at_end needs save_steps ({self.save_steps}) to be a multiple of "
                    f"eval_steps ({self.eval_steps}): only evaluated steps can be the best"
                )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.train_on_inputs and self.policy != "causal":
            raise ValueError(
                f"train_on_inputs would put the loss on bidirectional prompt tokens under mask {self.policy!r}; "
                "it is only allowed with policy: causal"
            )
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if self.uses_segment_ids:
            if self.attn_implementation not in SUPPORTED:
                raise ValueError(
                    f"attn_implementation {self.attn_implementation!r} cannot run mask {self.policy!r}"
                    f"{' with packing' if self.packing else ''} (it drops custom masks); use one of {', '.join(SUPPORTED)}"
                )
        from transformers import SchedulerType  # here, not at the top: `segmask train --help` stays light

        if self.lr_scheduler not in {s.value for s in SchedulerType}:
            raise ValueError(
                f"unknown lr_scheduler {self.lr_scheduler!r}; expected one of {[s.value for s in SchedulerType]}"
            )

    @property
    def uses_segment_ids(self) -> bool:
        """Whether batches carry segment/document ids (the causal policy without packing runs the model as is)."""
        return self.policy != "causal" or self.packing

    @property
    def order_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; an unknown key is a ``ValueError`` suggesting the closest field."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown config key {key!r}{hint}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a YAML mapping of fields; ``overrides`` (e.g. CLI flags) win over the file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(_yaml_error(path, error)) from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _yaml_error(path: Path, error: yaml.YAMLError) -> str:
    """One line: ``FILE:LINE:COLUMN: not valid YAML: PROBLEM (CONTEXT at line L, column C)``, 1-based
    (PyYAML's own text spans several lines, with the offending line drawn under a caret)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:
        return f"{path}: not valid YAML ({' '.join(str(error).split())})"
    text = f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
    context, where = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and where is not None:
        text += f" ({context} at line {where.line + 1}, column {where.column + 1})"
    elif context:
        text += f" ({context})"
    return text


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """``value`` as the declared type ``kind`` (int, float, bool, str, tuple[str, ...], or X | None)."""
    if get_origin(kind) in (Union, UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        kind = next(k for k in get_args(kind) if k is not NoneType)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if get_origin(kind) is tuple:
            items = [value] if isinstance(value, str | Path) else list(value)
            if not all(isinstance(item, str | Path) for item in items):
                raise TypeError
            return tuple(str(item) for item in items)
    except (TypeError, ValueError):
        pass
    else:
        return value
    expected = getattr(kind, "__name__", str(kind))
    raise ValueError(f"{name} must be {expected}, got {value!r}")
