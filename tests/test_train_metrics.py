"""`segmask.train_metrics`: metrics.jsonl read back, cut at a resumed step, and drawn as a loss curve."""

from __future__ import annotations

import json
import warnings

import pytest

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


def test_a_line_that_is_not_a_metrics_row_is_named(tmp_path):
    """A foreign metrics.jsonl is a ValueError naming the line, never a KeyError from deep inside resume."""
    path = tmp_path / "metrics.jsonl"
    for text, line in [('{"step": 1}\n{"accuracy": 0.5}\n', 2), ('{"step": 1}\nnot json\n', 2), ("[1]\n", 1)]:
        path.write_text(text)
        before = path.read_bytes()
        for read in (read_metrics, lambda p: truncate_metrics(p, 1)):
            with pytest.raises(ValueError, match=rf"metrics\.jsonl:{line}: not a segmask metrics row"):
                read(path)
        assert path.read_bytes() == before


def test_a_run_that_logged_no_loss_plots_without_a_warning(tmp_path):
    """max_steps below logging_steps: metrics.jsonl holds no loss; matplotlib warned of an empty legend."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_loss_curve(path, tmp_path / "loss_curve.png")
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
