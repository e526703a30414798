"""Fine-tune a causal LM under a mask policy with transformers' Trainer (LoRA or full): ``segmask train``.

    segmask train configs/cpu_smollm2.yaml --mask mas --max-steps 100
    accelerate launch -m segmask train configs/paper_llama3.2-1b.yaml --mask mas   # many GPUs, same command

From Python::

    from segmask import TrainConfig, train
    out = train(TrainConfig(model="../shared/models/stories260K", data=("train.json",), policy="mas"))

The loss falls only on causal answer tokens; prompt segments see themselves in full (``mas``/``prefix``).
What is written to ``output``::

    adapter_model.safetensors + adapter_config.json   (LoRA; with --merge: model.safetensors + config.json,
    model.safetensors + config.json                     the adapter kept in adapter/)   (full fine-tuning)
    tokenizer files, segmask.json (policy, causal_sink, template, base model, config, data fingerprint)
    checkpoint-N/ (atomic: written as checkpoint-N.tmp, then renamed), metrics.jsonl, loss_curve.png
    .segmask.lock while the run lasts: a second run into the same folder is refused, not interleaved

``overwrite: true`` removes only these files (:func:`segmask.train_output.run_files`): other files in the
folder stay. Inputs (data files, the base model) inside the output folder are refused.

``resume: true`` continues from the last complete checkpoint with the same data order, so the loss curve
is the one an uninterrupted run with the same seed would have drawn. It resumes only a segmask run with the
same config (the folder may have moved) and leaves a finished one as it is.

The config is :mod:`segmask.train_config`; the output folder's lock, ``overwrite`` and ``resume`` checks are
:mod:`segmask.train_output`; metrics.jsonl, the progress bar and the loss curve come from
:mod:`segmask.train_metrics`; segmask.json is a :class:`segmask.runs.Run`. This module is the run: checks,
model, Trainer, atomic checkpoints, final outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
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
from segmask.collate import Collator
from segmask.files import write_json_atomic
from segmask.hook import enable
from segmask.parallel import check_sequence_sharding
from segmask.runs import Run, write_run
from segmask.train_config import TrainConfig
from segmask.train_metrics import MetricsFile, ProgressBar, plot_loss_curve, truncate_metrics
from segmask.train_output import (
    LOSS_CURVE_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    checkpoint_step,
    finished_step,
    last_checkpoint,
    lock_output,
    prepare_output,
)

logger = logging.getLogger(__name__)

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
        policy=config.policy,
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
        data_collator=Collator(
            tokenizer,
            pack=config.packing,
            max_length=config.cutoff_len,
            with_segment_ids=config.uses_segment_ids,
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
            truncate_metrics(output / METRICS_FILE, checkpoint_step(checkpoint) if checkpoint else 0)
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

    run = Run(
        policy=config.policy,  # type: ignore[arg-type]
        causal_sink=config.causal_sink,  # type: ignore[arg-type]  (a bool: TrainConfig resolves it)
        template=data.template_name(records, config.template),
        base_model=str(loading.resolve_model(config.model).resolve()),
        adapter=config.lora_r > 0,
        train_config=config.to_dict(),
        data_fingerprint=data.fingerprint(records),
        segmask_version=__version__,
    )
    save_final(trainer, config, output, run)


def _trained_to_the_end(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds the run's last step (its trainer state says so)."""
    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    return state.max_steps > 0 and state.global_step >= state.max_steps


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
    needed = data.template_length(tokenizer, kinds, config.policy, config.template)
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


def save_final(trainer: Trainer, config: TrainConfig, output: Path, run: Run) -> None:
    """Write weights (adapter or full) and tokenizer, then segmask.json last; merge and plot if asked."""
    weights_dir = output / "adapter" if config.merge else output
    trainer.model.config.use_cache = True  # off while training; generation wants it
    trainer.save_model(str(weights_dir))
    if not trainer.is_world_process_zero():
        return
    if config.merge:
        write_run(weights_dir, run)
        loading.merge_adapter(config.model, weights_dir, output)
        trainer.processing_class.save_pretrained(str(output))  # the tokenizer trained with (--chat-template)
        run = dataclasses.replace(run, adapter=False)
    plot_loss_curve(output / METRICS_FILE, output / LOSS_CURVE_FILE)
    write_run(output, run)
