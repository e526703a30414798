"""`segmask.train_metrics`: metrics.jsonl read back, cut at a resumed step, and drawn as a loss curve."""

from __future__ import annotations

import json

from segmask import training
from segmask.train_metrics import plot_loss_curve, read_metrics, truncate_metrics


def test_truncate_keeps_rows_up_to_the_step_and_plot_draws_them(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    truncate_metrics(path, 3)  # nothing to cut: no file is made
    assert not path.exists()
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.9}, {"step": 4, "loss": 1.5}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
    truncate_metrics(path, 2)
    assert read_metrics(path) == rows[:2] and not list(tmp_path.glob("*.tmp"))
    plot_loss_curve(path, tmp_path / "loss_curve.png")
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert training.read_metrics is read_metrics  # its import path before train_metrics
