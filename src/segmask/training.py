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
    tokenizer files, segmask.json (policy, causal_sink, template, base model, config, data fingerprint)
    checkpoint-N/ (atomic: written as checkpoint-N.tmp, then renamed), metrics.jsonl, loss_curve.png
    .segmask.lock while the run lasts: a second run into the same folder is refused, not interleaved

``overwrite: true`` removes only these files (:func:`run_files`): other files in the folder stay. Inputs
(data files, the base model) inside the output folder are refused.

``resume: true`` continues from the last complete checkpoint with the same data order, so the loss curve
is the one an uninterrupted run with the same seed would have drawn. It resumes only a segmask run with the
same config (the folder may have moved) and leaves a finished one as it is.

The config is :mod:`segmask.train_config`; metrics.jsonl, the progress bar and the loss curve come from
:mod:`segmask.train_metrics`. This module is the run: checks, model, Trainer, checkpoints, final outputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from segmask import __version__, compat, data, loading
from segmask.attention import enable
from segmask.files import check_outputs, exclusive_lock, write_json_atomic
from segmask.parallel import check_sequence_sharding
from segmask.train_config import TrainConfig
from segmask.train_metrics import MetricsFile, ProgressBar, plot_loss_curve, truncate_metrics
from segmask.train_metrics import read_metrics as read_metrics  # its import path before train_metrics

logger = logging.getLogger(__name__)

_MOVED = ("resolve_model", "load_tokenizer", "merge_adapter")  # to segmask.loading, old path for one release


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"segmask.training.{name} moved to segmask.loading", DeprecationWarning, stacklevel=2)
        return getattr(loading, name)
    raise AttributeError(f"module 'segmask.training' has no attribute {name!r}")


METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
RUN_CONFIG_FILE = "train_config.json"
SEGMASK_FILE = "segmask.json"
LOCK_FILE = ".segmask.lock"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# every name a run writes into its output folder (weights, tokenizer, Trainer's and segmask's files), and
# checkpoint-N(.tmp), weight shards and write_json_atomic's temporaries: what --overwrite removes. peft's
# README.md is not among them: peft updates a README.md in place, which may be the user's notes
RUN_FILES = frozenset(
    {
        METRICS_FILE, LOSS_CURVE_FILE, RUN_CONFIG_FILE, SEGMASK_FILE, "training_args.bin", "adapter",
        "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
        "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
        "pytorch_model.bin", "pytorch_model.bin.index.json",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
        "chat_template.jinja", "chat_template.json", "additional_chat_templates", "tokenizer.model",
        "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
    }
)  # fmt: skip
RUN_FILE_RE = re.compile(r"^(checkpoint-\d+(\.tmp)?|model-\d+-of-\d+\.safetensors|\.(?P<name>.+)\.\d+\.tmp)$")
# fields that may change between an interrupted run and its --resume: the flags themselves, and where the
# run lives (a moved folder resumes); everything else defines the run
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "merge", "output"})
# fields added after runs were saved, with the value such a run had: it resumes unless the new one differs
ADDED_FIELDS: dict[str, Any] = {
    "causal_sink": False,
    "template": "alpaca",
    "load_best_model_at_end": False,
    "chat_template": None,
}


# ---- the run -------------------------------------------------------------------------------------


class Interrupted(RuntimeError):
    """Training stopped before its last step; the checkpoints in ``output`` let ``resume`` continue."""


def train(config: TrainConfig, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """Run ``config`` to the end and return the output folder (see the module docstring for its contents).

    Every check (output folder, data files and records, cutoff vs template, model and mask backend) runs
    before the first step; ``callbacks`` are extra ``TrainerCallback`` objects (e.g. for tests). The output
    folder is locked (``.segmask.lock``) from its checks to the end: another run into it is a ``ValueError``.
    """
    output = Path(config.output)
    records = data.read_records(data.expand_paths(config.data))
    train_records, eval_records = data.split_records(
        records, config.eval_size, config.order_seed, config.max_records
    )
    arguments = training_arguments(config, output, has_eval=bool(eval_records))  # sets up the processes
    if config.uses_segment_ids:  # context/sequence parallelism drops the mask: it would train causally
        check_sequence_sharding(getattr(arguments, "parallelism_config", None))
    with contextlib.ExitStack() as held:
        with arguments.main_process_first(local=False, desc="checking the output folder"):
            if arguments.should_save:
                held.enter_context(lock_output(output))
                finished = prepare_output(config, output)
            else:
                finished = finished_step(output) if config.resume else None
        if finished is not None:  # resuming a finished run: nothing to train, nothing to write
            logger.info("%s already finished at step %d; nothing to do", output, finished)
            return output
        _run(config, output, records, train_records, eval_records, arguments, callbacks)
    return output


def _run(
    config: TrainConfig,
    output: Path,
    records: Sequence[data.Record],
    train_records: Sequence[data.Record],
    eval_records: Sequence[data.Record],
    arguments: TrainingArguments,
    callbacks: Sequence[TrainerCallback],
) -> None:
    """The run once its output folder is checked and locked: tokenizer, data, model, Trainer, outputs."""
    checkpoint = last_checkpoint(output) if config.resume else None
    tokenizer = loading.load_tokenizer(config.model)
    if config.chat_template is not None:
        loading.set_chat_template(tokenizer, config.chat_template)
    check_chat_template(tokenizer, records, config)
    check_cutoff(tokenizer, records, config)
    encode = dict(
        policy=config.mask,
        cutoff_len=config.cutoff_len,
        overflow=config.overflow,
        train_on_inputs=config.train_on_inputs,
        causal_sink=config.causal_sink,
        template=config.template,
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

    if config.uses_segment_ids:  # also set from an accelerate config file, which the arguments do not see
        check_sequence_sharding(getattr(trainer.accelerator, "parallelism_config", None))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if trainer.is_world_process_zero():
        write_json_atomic(output / RUN_CONFIG_FILE, config.to_dict())
        if config.resume:
            truncate_metrics(output / METRICS_FILE, _checkpoint_step(checkpoint) if checkpoint else 0)
    if checkpoint is not None and _trained_to_the_end(checkpoint):
        # the last step is saved but the final outputs are not (stopped while writing them): write them from
        # the checkpoint; Trainer would run one step past max_steps when resumed there
        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
        best = trainer.state.best_model_checkpoint
        if config.load_best_model_at_end and best is not None and Path(best).is_dir():
            trainer._load_best_model()  # what the uninterrupted run's end would have loaded
    else:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.state.global_step < trainer.state.max_steps:
        raise Interrupted(
            f"training stopped at step {trainer.state.global_step}; rerun with --resume to continue"
        )

    info = {
        "policy": config.mask,
        "causal_sink": config.causal_sink,
        "template": data.template_name(records, config.template),
        "base_model": str(loading.resolve_model(config.model).resolve()),
        "adapter": config.lora_r > 0,
        "train_config": config.to_dict(),
        "data_fingerprint": data.fingerprint(records),
        "segmask_version": _version(),
    }
    save_final(trainer, config, output, info)


@contextlib.contextmanager
def lock_output(output: Path) -> Iterator[None]:
    """Create ``output`` and hold its lock (:func:`segmask.files.exclusive_lock` on ``output/.segmask.lock``)
    for the ``with`` block; a ``ValueError`` when it is a file, cannot be written, or another run holds it."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} is a file, not a folder")
    with contextlib.ExitStack() as held:
        try:
            output.mkdir(parents=True, exist_ok=True)
            held.enter_context(exclusive_lock(output / LOCK_FILE, f"output {output}"))
        except OSError as error:
            raise ValueError(f"cannot write to output {output}: {error.strerror or error}") from None
        yield


def run_files(output: Path) -> list[Path]:
    """The entries of ``output`` that a run writes (:data:`RUN_FILES`, checkpoints, shards, temporaries),
    which ``overwrite`` removes; the lock file and anything else stay."""
    found = []
    for entry in sorted(output.iterdir()):
        match = RUN_FILE_RE.match(entry.name)
        if entry.name in RUN_FILES or (match and (match["name"] is None or match["name"] in RUN_FILES)):
            found.append(entry)
    return found


def prepare_output(config: TrainConfig, output: Path) -> int | None:
    """Check ``output`` against ``resume``/``overwrite`` before anything is written, then make it ready.

    Refuses (``ValueError``, nothing touched) a file, an unwritable folder, a folder holding the run's data
    or base model, a folder of other files under ``resume`` or ``overwrite``, a run with another config
    under ``resume``, and any existing run without one of them. Returns the last step of a finished run that
    ``resume`` leaves as it is (else ``None``); otherwise removes the run's files (:func:`run_files`) for
    ``overwrite`` or half-written ``checkpoint-N.tmp`` folders for ``resume``. Called under
    :func:`lock_output`: the folder does not change while it looks.
    """
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} is a file, not a folder")
    inputs = [*data.expand_paths(config.data), Path(config.model)]
    if config.chat_template is not None and os.path.isfile(config.chat_template):
        inputs.append(Path(config.chat_template))
    check_outputs([("output", output)], inputs)
    existing = output.is_dir() and any(entry.name != LOCK_FILE for entry in output.iterdir())
    if existing and (config.resume or config.overwrite):
        saved = saved_config(output)
        if saved is None:
            flag = "--resume" if config.resume else "--overwrite"
            raise ValueError(
                f"output {output} is not a segmask run folder (no {RUN_CONFIG_FILE} or {SEGMASK_FILE}); "
                f"refusing {flag} into it"
            )
        if config.resume:
            _check_same_run(config, saved, output)
            read_metrics(output / METRICS_FILE)  # a metrics file of other rows fails here, not mid-run
            finished = finished_step(output)
            if finished is not None:
                return finished
    elif existing:
        raise ValueError(
            f"output {output} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):  # written and gone: the folder is left as it was
            pass
    except OSError as error:
        raise ValueError(f"cannot write to output {output}: {error.strerror or error}") from None
    if existing and config.overwrite:
        for entry in run_files(output):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    if config.resume:
        for stale in output.glob("checkpoint-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if last_checkpoint(output) is None:
            logger.warning("no complete checkpoint in %s; starting from scratch", output)
    return None


def saved_config(output: Path) -> dict[str, Any] | None:
    """The config a segmask run in ``output`` was started with (its train_config.json, else the one in
    segmask.json), or ``None`` when ``output`` holds no segmask run."""
    for name, key in ((RUN_CONFIG_FILE, None), (SEGMASK_FILE, "train_config")):
        path = output / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if key is not None and isinstance(value, dict):
            value = value.get(key)
        if isinstance(value, dict) and {"model", "data", "mask"} <= value.keys():
            return value
    return None


def _check_same_run(config: TrainConfig, saved: dict[str, Any], output: Path) -> None:
    """Refuse to resume with a config that changes the run (the data order and schedule depend on it)."""
    changed = sorted(
        k
        for k, v in config.to_dict().items()
        if k not in RESUMABLE_CHANGES and saved.get(k, ADDED_FIELDS.get(k)) != v
    )
    if changed:
        raise ValueError(
            f"cannot resume {output} with a different config ({', '.join(changed)} changed); "
            "the data order and schedule depend on it"
        )


def finished_step(output: Path) -> int | None:
    """The last step of the finished run in ``output`` (its segmask.json is written last), else ``None``."""
    info = output / SEGMASK_FILE
    if not info.is_file():
        return None
    checkpoint = last_checkpoint(output)
    if checkpoint is not None:
        return _checkpoint_step(checkpoint)
    return max((row["step"] for row in read_metrics(output / METRICS_FILE)), default=0)


def _trained_to_the_end(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds the run's last step (its trainer state says so)."""
    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    return state.max_steps > 0 and state.global_step >= state.max_steps


def last_checkpoint(output: Path) -> Path | None:
    """The complete ``checkpoint-N`` folder with the highest N (``.tmp`` folders are never complete)."""
    if not output.is_dir():
        return None
    steps = [
        (int(m.group(1)), p) for p in output.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return max(steps)[1] if steps else None


def _checkpoint_step(checkpoint: Path) -> int:
    return int(CHECKPOINT_RE.match(checkpoint.name).group(1))


def check_chat_template(tokenizer, records: Sequence[data.Record], config: TrainConfig) -> None:
    """Refuse chat records for a tokenizer without a chat template, naming the flag that gives one."""
    if not getattr(tokenizer, "chat_template", None) and any(data.record_kind(r) == "chat" for r in records):
        raise ValueError(
            f"the data holds chat records but {config.model} has no chat template; pass --chat-template FILE "
            "(chat_template: in a YAML config), a Jinja file or the template itself"
        )


def check_cutoff(tokenizer, records: Sequence[data.Record], config: TrainConfig) -> None:
    """Refuse a ``cutoff_len`` that the prompt template alone fills (no room for an answer)."""
    kinds = {data.record_kind(record) for record in records}
    needed = data.template_length(tokenizer, kinds, config.mask, config.template)
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
    with compat.quiet_peft():
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
        # the official recipe (DoRA finetune.py): keep the checkpoint of the lowest eval loss, reload it at the end
        load_best_model_at_end=config.load_best_model_at_end and has_eval,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
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
            self._point_at_the_best(run_dir, final)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _point_at_the_best(self, run_dir: Path, final: Path) -> None:
        """Trainer recorded the best checkpoint under the staging folder (or not at all, when it was an
        earlier one); point ``best_model_checkpoint`` at ``run_dir/checkpoint-<best step>`` and save that in
        the new checkpoint's state, so the best-model reload and ``resume`` find it."""
        step = self.state.best_global_step
        best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}" if step else None
        if best is None or not best.is_dir():
            return
        self.state.best_model_checkpoint = str(best)
        self.state.save_to_json(str(final / TRAINER_STATE_NAME))


# ---- final outputs --------------------------------------------------------------------------------


def save_final(trainer: Trainer, config: TrainConfig, output: Path, info: dict[str, Any]) -> None:
    """Write weights (adapter or full) and tokenizer, then segmask.json last; merge and plot if asked."""
    weights_dir = output / "adapter" if config.merge else output
    trainer.model.config.use_cache = True  # off while training; generation wants it
    trainer.save_model(str(weights_dir))
    if not trainer.is_world_process_zero():
        return
    if config.merge:
        write_json_atomic(weights_dir / SEGMASK_FILE, info)
        loading.merge_adapter(config.model, weights_dir, output)
        trainer.processing_class.save_pretrained(str(output))  # the tokenizer trained with (--chat-template)
        info = {**info, "adapter": False}
    plot_loss_curve(output / METRICS_FILE, output / LOSS_CURVE_FILE)
    write_json_atomic(output / SEGMASK_FILE, info)


def _version() -> str:
    return __version__
