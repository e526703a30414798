"""``segmask lm-eval``: hands its arguments to lm-evaluation-harness's command line (the "segmask" model
itself: tests/integrations/test_lm_eval.py)."""

from __future__ import annotations

import pytest
from conftest import ROOT

import segmask.integrations.lm_eval as backend
from segmask.cli import build_parser
from segmask.cli import main as segmask_main


def test_segmask_lm_eval_subcommand_runs_the_script_function(monkeypatch, capsys):
    """`segmask lm-eval ARGS` hands ARGS, unchanged, to the function the segmask-lm-eval script runs."""
    script = ROOT.joinpath("pyproject.toml").read_text()
    assert 'segmask-lm-eval = "segmask.integrations.lm_eval:main"' in script
    argv = [
        "--model",
        "segmask",
        "--model_args",
        "pretrained=m,mask=mas",
        "--tasks",
        "boolq",
        "-h",
        "--",
        "x",
    ]
    assert build_parser().parse_args(["lm-eval", *argv]).argv == argv
    calls = []
    monkeypatch.setattr(backend, "main", calls.append)
    assert segmask_main(["lm-eval", *argv]) == 0 and calls == [argv]
    monkeypatch.undo()
    with pytest.raises(SystemExit) as done:  # the real lm_eval command line answers --help
        segmask_main(["lm-eval", "--help"])
    assert done.value.code == 0 and "--model_args" in capsys.readouterr().out
