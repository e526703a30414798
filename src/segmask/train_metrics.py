"""What a training run reports: metrics.jsonl (every log, with tokens per second), a progress bar, the loss
curve. Trainer callbacks and the file helpers; :func:`segmask.training.train` installs them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from segmask.files import write_text_atomic


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
    """The rows of a metrics.jsonl file (none if it does not exist); a ``ValueError`` names a line that is
    not a metrics row (a JSON object with an integer ``step``)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            raise ValueError(f"{path}:{number}: not a segmask metrics row (a JSON object with a step)")
        rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (a resumed run logs them again)."""
    path = Path(path)
    if not path.exists():
        return
    rows = [row for row in read_metrics(path) if row["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))  # a kill never leaves half


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
    if ax.get_legend_handles_labels()[0]:  # a run shorter than logging_steps logs no loss
        ax.legend()
    else:
        ax.text(
            0.5, 0.5, "no loss logged (fewer steps than logging_steps)", ha="center", transform=ax.transAxes
        )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
