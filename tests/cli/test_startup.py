"""The command line starts at once: `segmask --help` and `segmask <command> --help` import no heavy library.

Timing is the benchmark's job (benchmarks/cli_start.py); what a test can check, and what decides the time,
is which modules a help screen imports.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from segmask.cli import COMMANDS

HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "peft", "trl", "datasets", "matplotlib", "lm_eval")

PROBE = """
import contextlib, io, json, sys
from segmask.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(sys.argv[1:])
    except SystemExit as done:
        code = done.code
heavy = sorted(name for name in sys.modules if name.split(".")[0] in {heavy!r})
print(json.dumps({{"code": code, "heavy": sorted({{n.split(".")[0] for n in heavy}}), "out": out.getvalue()}}))
"""


def help_screen(*argv: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=set(HEAVY)), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_the_top_level_help_imports_nothing_heavy():
    shown = help_screen("--help")
    assert shown["code"] == 0 and shown["heavy"] == []
    assert all(name in shown["out"] for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_commands_help_imports_nothing_heavy(command):
    if command == "lm-eval":  # its --help is lm_eval's own, which lm_eval prints: nothing of ours to show
        pytest.skip("lm-eval hands --help to lm_eval")
    shown = help_screen(command, "--help")
    assert shown["code"] == 0 and shown["out"].startswith(f"usage: segmask {command}")
    assert shown["heavy"] == [], f"segmask {command} --help imports {shown['heavy']}"
