"""A training run's output folder: what a run writes there, its lock, the ``overwrite`` and ``resume`` checks.

    with lock_output(output):                        # a second run into the folder is refused
        finished = prepare_output(config, output)    # refuse, clear (overwrite) or pick up (resume)

A run writes the names of :data:`RUN_FILES` (weights, tokenizer, ``segmask.json``, ``train_config.json``,
``metrics.jsonl``, ``loss_curve.png``), ``checkpoint-N/`` folders and temporaries; ``overwrite`` removes only
those (:func:`run_files`). ``resume`` continues a segmask run with the same config
(:data:`RESUMABLE_CHANGES` aside) from its last complete checkpoint (:func:`last_checkpoint`). The run itself
is :func:`segmask.training.train`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from segmask import data
from segmask.files import check_outputs, exclusive_lock
from segmask.runs import RUN_FILE
from segmask.train_config import TrainConfig
from segmask.train_metrics import read_metrics

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
RUN_CONFIG_FILE = "train_config.json"
LOCK_FILE = ".segmask.lock"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# every name a run writes into its output folder (weights, tokenizer, Trainer's and segmask's files), and
# checkpoint-N(.tmp), weight shards and write_json_atomic's temporaries: what --overwrite removes. peft's
# README.md is not among them: peft updates a README.md in place, which may be the user's notes
RUN_FILES = frozenset(
    {
        METRICS_FILE, LOSS_CURVE_FILE, RUN_CONFIG_FILE, RUN_FILE, "training_args.bin", "adapter",
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
# train_config.json of a run saved before the names of issue 32: the field and overflow values it used
RENAMED_FIELDS = {"mask": "policy"}
RENAMED_OVERFLOWS = {"raise": "error", "drop": "skip", "truncate_prompt": "truncate"}


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
                f"output {output} is not a segmask run folder (no {RUN_CONFIG_FILE} or {RUN_FILE}); "
                f"refusing {flag} into it"
            )
        if config.resume:
            check_same_run(config, saved, output)
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
    segmask.json), or ``None`` when ``output`` holds no segmask run. A config saved before issue 32 reads
    under today's names (``mask`` is ``policy``; overflow ``raise``/``drop``/``truncate_prompt`` are
    ``error``/``skip``/``truncate``)."""
    for name, key in ((RUN_CONFIG_FILE, None), (RUN_FILE, "train_config")):
        path = output / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if key is not None and isinstance(value, dict):
            value = value.get(key)
        if isinstance(value, dict):
            value = {RENAMED_FIELDS.get(k, k): v for k, v in value.items()}
            if value.get("overflow") in RENAMED_OVERFLOWS:
                value["overflow"] = RENAMED_OVERFLOWS[value["overflow"]]
            if {"model", "data", "policy"} <= value.keys():
                return value
    return None


def check_same_run(config: TrainConfig, saved: dict[str, Any], output: Path) -> None:
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
    info = output / RUN_FILE
    if not info.is_file():
        return None
    checkpoint = last_checkpoint(output)
    if checkpoint is not None:
        return checkpoint_step(checkpoint)
    return max((row["step"] for row in read_metrics(output / METRICS_FILE)), default=0)


def last_checkpoint(output: Path) -> Path | None:
    """The complete ``checkpoint-N`` folder with the highest N (``.tmp`` folders are never complete)."""
    if not output.is_dir():
        return None
    steps = [
        (int(m.group(1)), p) for p in output.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return max(steps)[1] if steps else None


def checkpoint_step(checkpoint: Path) -> int:
    return int(CHECKPOINT_RE.match(checkpoint.name).group(1))
