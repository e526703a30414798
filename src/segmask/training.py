"""Fine-tune a causal LM under a mask policy with transformers' Trainer (LoRA or full): ``segmask train``.

    segmask train configs/cpu_smollm2.yaml --mask mas --max-steps 100
    accelerate launch -m segmask train configs/paper_llama3.2-1b.yaml --mask mas   # many GPUs, same command

From Python::

    from segmask import TrainConfig, train
    out = train(TrainConfig(model="../shared/models/stories260K", data=("train.json",), mask="mas"))

The loss falls only on causal answer tokens; prompt segments see themselves in full (``mas``/``prefix``).
What is written to ``output``::

    adapter_model.safetensors + adapter_config.json   (LoRA; with --merge: model.safetensors + config.json,
    model.safetensors + config.json                     the adapter kept in adapter/)   (full fine-tuning)
    tokenizer files, segmask.json (policy, template, base model, config, data fingerprint)
    checkpoint-N/ (atomic: written as checkpoint-N.tmp, then renamed), metrics.jsonl, loss_curve.png

``resume: true`` continues from the last complete checkpoint with the same data order, so the loss curve
is the one an uninterrupted run with the same seed would have drawn.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
import yaml
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    SchedulerType,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from segmask import __version__, data, loading, masks
from segmask.attention import SUPPORTED, enable
from segmask.segments import OVERFLOWS

logger = logging.getLogger(__name__)

_MOVED = ("resolve_model", "load_tokenizer", "merge_adapter")  # to segmask.loading, old path for one release


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"segmask.training.{name} moved to segmask.loading", DeprecationWarning, stacklevel=2)
        return getattr(loading, name)
    raise AttributeError(f"module 'segmask.training' has no attribute {name!r}")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
RUN_CONFIG_FILE = "train_config.json"
SEGMASK_FILE = "segmask.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# fields that may change between an interrupted run and its --resume
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "merge"})


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
    mask: str = _help("mask policy: causal, mas or prefix", "mas")
    # data
    cutoff_len: int = _help("most tokens per example (prompt + answer)", 256)
    overflow: str = _help(
        "a record over cutoff_len: drop, truncate_prompt (answers are never cut) or raise", "drop"
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
    resume: bool = _help("continue from the last complete checkpoint in output", False)
    merge: bool = _help("also write the LoRA adapter merged into the base weights", False)
    overwrite: bool = _help("replace an existing run in output", False)

    def __post_init__(self) -> None:
        for name, kind in get_type_hints(TrainConfig).items():
            object.__setattr__(self, name, _coerce(name, getattr(self, name), kind))
        self._validate()

    def _validate(self) -> None:
        if not self.model:
            raise ValueError("model is required (a local transformers folder or .gguf file)")
        if not self.data:
            raise ValueError("data is required: one or more training files")
        masks.check_policy(self.mask)
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
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.train_on_inputs and self.mask != "causal":
            raise ValueError(
                f"train_on_inputs would put the loss on bidirectional prompt tokens under mask {self.mask!r}; "
                "it is only allowed with mask: causal"
            )
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if self.uses_segment_ids:
            if self.attn_implementation not in SUPPORTED:
                raise ValueError(
                    f"attn_implementation {self.attn_implementation!r} cannot run mask {self.mask!r}"
                    f"{' with packing' if self.packing else ''} (it drops custom masks); use one of {', '.join(SUPPORTED)}"
                )
        if self.lr_scheduler not in {s.value for s in SchedulerType}:
            raise ValueError(
                f"unknown lr_scheduler {self.lr_scheduler!r}; expected one of {[s.value for s in SchedulerType]}"
            )

    @property
    def uses_segment_ids(self) -> bool:
        """Whether batches carry segment/document ids (the causal policy without packing runs the model as is)."""
        return self.mask != "causal" or self.packing

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
            raise ValueError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


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


# ---- the run -------------------------------------------------------------------------------------


class Interrupted(RuntimeError):
    """Training stopped before its last step; the checkpoints in ``output`` let ``resume`` continue."""


def train(config: TrainConfig, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """Run ``config`` to the end and return the output folder (see the module docstring for its contents).

    Every check (output folder, data files and records, cutoff vs template, model and mask backend) runs
    before the first step; ``callbacks`` are extra ``TrainerCallback`` objects (e.g. for tests).
    """
    output = Path(config.output)
    records = data.read_records(data.expand_paths(config.data))
    train_records, eval_records = data.split_records(
        records, config.eval_size, config.order_seed, config.max_records
    )
    arguments = training_arguments(config, output, has_eval=bool(eval_records))  # sets up the processes
    with arguments.main_process_first(local=False, desc="checking the output folder"):
        if arguments.should_save:
            prepare_output(config, output)
    checkpoint = last_checkpoint(output) if config.resume else None
    tokenizer = loading.load_tokenizer(config.model)
    check_cutoff(tokenizer, records, config)
    encode = dict(
        policy=config.mask,
        cutoff_len=config.cutoff_len,
        overflow=config.overflow,
        train_on_inputs=config.train_on_inputs,
    )
    train_set = data.encode_records(tokenizer, train_records, **encode)
    eval_set = data.encode_records(tokenizer, eval_records, **encode) if eval_records else None
    set_seed(config.seed)  # LoRA initialisation, before the model is built
    model = build_model(config)

    trainer = SegmaskTrainer(
        model=model,
        args=arguments,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=data.DataCollator(
            tokenizer,
            with_segment_ids=config.uses_segment_ids,
            pack=config.packing,
            max_length=config.cutoff_len,
        ),
        processing_class=tokenizer,
        callbacks=[MetricsFile(output / METRICS_FILE), ProgressBar(), *callbacks],
    )

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if trainer.is_world_process_zero():
        _write_json(output / RUN_CONFIG_FILE, config.to_dict())
        if config.resume:
            truncate_metrics(output / METRICS_FILE, _checkpoint_step(checkpoint) if checkpoint else 0)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.state.global_step < trainer.state.max_steps:
        raise Interrupted(
            f"training stopped at step {trainer.state.global_step}; rerun with --resume to continue"
        )

    info = {
        "policy": config.mask,
        "template": data.template_name(records),
        "base_model": str(loading.resolve_model(config.model).resolve()),
        "adapter": config.lora_r > 0,
        "train_config": config.to_dict(),
        "data_fingerprint": data.fingerprint(records),
        "segmask_version": _version(),
    }
    save_final(trainer, config, output, info)
    return output


def prepare_output(config: TrainConfig, output: Path) -> None:
    """Check ``output`` against ``resume``/``overwrite``: refuse to train into an existing run unless resuming
    (or overwriting a folder that is a segmask run), and remove half-written ``checkpoint-N.tmp`` folders."""
    existing = output.exists() and any(output.iterdir())
    if existing and config.overwrite:
        if not ((output / RUN_CONFIG_FILE).exists() or (output / SEGMASK_FILE).exists()):
            raise ValueError(
                f"output {output} is not a segmask run folder; refusing to delete it for --overwrite"
            )
        shutil.rmtree(output)
        existing = False
    if existing and not config.resume:
        raise ValueError(
            f"output {output} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    output.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        return
    for stale in output.glob("checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    saved = output / RUN_CONFIG_FILE
    if saved.exists():
        before = json.loads(saved.read_text())
        changed = sorted(
            k for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and before.get(k) != v
        )
        if changed:
            raise ValueError(
                f"cannot resume {output} with a different config ({', '.join(changed)} changed); "
                "the data order and schedule depend on it"
            )
    if last_checkpoint(output) is None:
        logger.warning("no complete checkpoint in %s; starting from scratch", output)


def last_checkpoint(output: Path) -> Path | None:
    """The complete ``checkpoint-N`` folder with the highest N (``.tmp`` folders are never complete)."""
    steps = [
        (int(m.group(1)), p) for p in output.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return max(steps)[1] if steps else None


def _checkpoint_step(checkpoint: Path) -> int:
    return int(CHECKPOINT_RE.match(checkpoint.name).group(1))


def check_cutoff(tokenizer, records: Sequence[data.Record], config: TrainConfig) -> None:
    """Refuse a ``cutoff_len`` that the prompt template alone fills (no room for an answer)."""
    kinds = {data.record_kind(record) for record in records}
    needed = data.template_length(tokenizer, kinds, config.mask)
    if config.cutoff_len <= needed:
        raise ValueError(
            f"cutoff_len {config.cutoff_len} is shorter than the prompt template ({needed} tokens for an "
            "example with empty fields); raise cutoff_len"
        )


def build_model(config: TrainConfig):
    """Load the base model in float32 with ``attn_implementation``, enable MAS, add LoRA (``lora_r > 0``)."""
    source = loading.pretrained_folder(config.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, attn_implementation=config.attn_implementation, dtype=torch.float32, local_files_only=True
        )
    except ImportError as error:  # e.g. flash_attention_2 without the flash-attn package
        raise ValueError(
            f"cannot load {config.model} with attn_implementation={config.attn_implementation!r}: {error}"
        ) from None
    model.config.use_cache = False
    if config.uses_segment_ids:
        enable(model)  # raises ValueError for a backend that cannot run the mask
    if config.lora_r == 0:
        return model
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def precision_flags(precision: str) -> dict[str, bool]:
    """``bf16``/``fp16`` TrainingArguments for ``precision``; a ``ValueError`` where the device lacks it."""
    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return {"bf16": bf16_ok, "fp16": cuda and not bf16_ok}
    if precision == "fp16" and not cuda:
        raise ValueError("precision fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
    if precision == "bf16" and cuda and not bf16_ok:
        raise ValueError("this GPU does not support bf16; use fp16 or fp32")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_arguments(config: TrainConfig, output: Path, has_eval: bool):
    """transformers ``TrainingArguments`` for ``config`` (segment ids kept, seeded order, token counting)."""

    return TrainingArguments(
        output_dir=str(output),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        **_checkpointing_flags(TrainingArguments, config.gradient_checkpointing),
        **precision_flags(config.precision),
        seed=config.seed,
        data_seed=config.order_seed,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,  # keep segment_ids (and document_ids) for the collator
        label_names=["labels"],  # peft models hide the label argument from Trainer's signature check
        include_num_input_tokens_seen="non_padding",
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to="none",
        disable_tqdm=True,  # ProgressBar below shows loss and tokens/s
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # without an accelerator, say so: `torchrun`/`accelerate launch` processes then train as one
        # data-parallel job over gloo, instead of as independent jobs racing on one output folder
        use_cpu=not _has_accelerator(),
    )


def _has_accelerator() -> bool:
    """CUDA, XPU, MPS or any other device torch knows (``torch.accelerator``, torch >= 2.6)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _checkpointing_flags(arguments: type, enabled: bool) -> dict[str, Any]:
    """Activation checkpointing under its current TrainingArguments name (``gradient_checkpointing`` before 5.x)."""
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in arguments.__dataclass_fields__
        else "gradient_checkpointing"
    )
    # non-reentrant checkpointing keeps gradients flowing into LoRA weights whose inputs need no grad
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


# ---- Trainer with atomic checkpoints and a resumable length-grouped order -------------------------


class EpochLengthGroupedSampler(torch.utils.data.Sampler):
    """transformers' length grouping with the order fixed by ``seed`` and the epoch (not the global RNG),
    so a resumed run draws the same batches as an uninterrupted one."""

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int):
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))


class SegmaskTrainer(Trainer):
    """Trainer whose checkpoints appear atomically and whose length-grouped order survives ``resume``.

    Trainer writes ``checkpoint-N`` in place, so a kill during a save leaves a folder that looks complete.
    Here each checkpoint is written under ``checkpoint-N.tmp/`` and renamed into place when whole.
    """

    _staging_dir: str | None = None

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        group = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return EpochLengthGroupedSampler(dataset[self.args.length_column_name], group, self.args.data_seed)

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:

        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{name}.tmp"
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = run_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


# ---- progress, metrics, plots ---------------------------------------------------------------------


class MetricsFile(TrainerCallback):
    """Append every log (loss, learning rate, eval loss, ...) to a JSONL file, with tokens per second.

    ``tokens_per_second`` counts non-padding input tokens over the time since the previous training log,
    not counting evaluation or checkpoint time.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._mark = (time.perf_counter(), 0)

    def _reset(self, state) -> None:
        self._mark = (time.perf_counter(), state.num_input_tokens_seen)

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset(state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._reset(state)

    def on_save(self, args, state, control, **kwargs):
        self._reset(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs:
            seconds = time.perf_counter() - self._mark[0]
            tokens = state.num_input_tokens_seen - self._mark[1]
            logs["tokens_per_second"] = tokens / seconds if seconds > 0 else 0.0
            self._reset(state)
        if state.is_world_process_zero:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs, "time": time.time()}) + "\n")


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimiser steps showing the latest loss, eval loss and tokens per second."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        shown = {}
        if "loss" in logs:
            shown["loss"] = f"{logs['loss']:.4f}"
        if "eval_loss" in logs:
            shown["eval"] = f"{logs['eval_loss']:.4f}"
        if "tokens_per_second" in logs:
            shown["tok/s"] = f"{logs['tokens_per_second']:.0f}"
        if shown:
            self.bar.set_postfix(shown, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (none if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (a resumed run logs them again)."""
    rows = [row for row in read_metrics(path) if row["step"] <= step]
    if Path(path).exists():
        _write_text(Path(path), "".join(json.dumps(row) + "\n" for row in rows))


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """Training (and eval) loss against the optimiser step, from metrics.jsonl."""
    # imported here: matplotlib needs its backend chosen before pyplot loads, and only plotting uses it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(row["step"], row[key]) for row in rows if key in row]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ---- final outputs --------------------------------------------------------------------------------


def save_final(trainer: Trainer, config: TrainConfig, output: Path, info: dict[str, Any]) -> None:
    """Write weights (adapter or full) and tokenizer, then segmask.json last; merge and plot if asked."""
    weights_dir = output / "adapter" if config.merge else output
    trainer.model.config.use_cache = True  # off while training; generation wants it
    trainer.save_model(str(weights_dir))
    if not trainer.is_world_process_zero():
        return
    if config.merge:
        _write_json(weights_dir / SEGMASK_FILE, info)
        loading.merge_adapter(config.model, weights_dir, output)
        info = {**info, "adapter": False}
    plot_loss_curve(output / METRICS_FILE, output / LOSS_CURVE_FILE)
    _write_json(output / SEGMASK_FILE, info)


def _version() -> str:
    return __version__


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    _write_text(path, json.dumps(value, indent=2) + "\n")
