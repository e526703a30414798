"""benchmarks/cli_start.py, which the README quotes, runs and times every help screen (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from segmask.cli import COMMANDS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cli_start.py"


def test_cli_start_times_every_help_screen():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--repeats", "1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| `segmask --help` |" in done.stdout and "load average at end" in done.stdout
    for name in COMMANDS:
        if name != "lm-eval":
            assert f"| `segmask {name} --help` |" in done.stdout
