"""Two-process training races: `segmask train` runs into one output folder never interleave. The folder's
lock (.segmask.lock, flock) admits one run; any other exits 2 with one line and changes nothing, and a
killed run leaves the folder free for the next."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_recipe

from segmask import train_output
from segmask.files import exclusive_lock
from segmask.runs import RUN_FILE

RECORDS = [
    {"instruction": f"What did {name} see?", "input": "", "output": f"{name} saw a {thing}."}
    for name in ("Lily", "Tom", "Sue") for thing in ("cat", "dog", "ball")
]  # fmt: skip
SETTINGS = (
    "batch_size: 3\ngradient_accumulation_steps: 1\nlearning_rate: 1e-2\nwarmup_steps: 0\nlora_r: 8\n"
    "lora_alpha: 16\ncutoff_len: 128\nlogging_steps: 1\n"
)


@pytest.fixture
def recipe(stories_path, tmp_path) -> Path:
    return write_recipe(tmp_path, stories_path, RECORDS, SETTINGS)


def segmask_train(recipe: Path, output: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "segmask", "train", str(recipe), "--output", str(output), *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def logged_steps(output: Path) -> list[int]:
    rows = [json.loads(line) for line in (output / train_output.METRICS_FILE).read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


def test_a_run_into_a_locked_folder_exits_2_and_writes_nothing(recipe, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    with exclusive_lock(output / train_output.LOCK_FILE, "test"):  # as a run in another process holds it
        code, out, err = finish(segmask_train(recipe, output, "--max-steps", "2"))
        assert code == 2, err[-2000:]
        assert (
            err
            == f"segmask train: error: output {output} is in use by another run (process {os.getpid()}); wait for it to end\n"
        )
        assert sorted(p.name for p in output.iterdir()) == [train_output.LOCK_FILE] and out == ""


@pytest.mark.slow
def test_overwrite_while_a_run_trains_is_refused_and_a_killed_run_frees_the_folder(recipe, tmp_path):
    """--overwrite into a folder that another process is training in would delete its checkpoints under it;
    it exits 2 and the first run's files stay. SIGKILL (no clean-up runs) leaves the folder to the next run."""
    output = tmp_path / "run"
    first = segmask_train(recipe, output, "--max-steps", "100000", "--save-steps", "2", "--seed", "1")
    try:
        deadline = time.monotonic() + 300
        while not (output / "checkpoint-2").is_dir():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first run wrote no checkpoint in 300 s"
            time.sleep(0.2)
        code, _, err = finish(segmask_train(recipe, output, "--max-steps", "3", "--seed", "2", "--overwrite"))
        assert code == 2 and err.count("\n") == 1, err[-2000:]
        assert f"output {output} is in use by another run (process {first.pid})" in err
        assert first.poll() is None  # still training, its checkpoints and config untouched
        assert json.loads((output / train_output.RUN_CONFIG_FILE).read_text())["seed"] == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert (
        train_output.last_checkpoint(output) is not None and (output / train_output.LOCK_FILE).exists()
    )  # stale

    code, out, err = finish(segmask_train(recipe, output, "--max-steps", "3", "--seed", "2", "--overwrite"))
    assert code == 0, err[-2000:]
    assert logged_steps(output) == [1, 2, 3]
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-3"]  # the first run's are gone
    assert json.loads((output / train_output.RUN_CONFIG_FILE).read_text())["seed"] == 2
    assert not (output / train_output.LOCK_FILE).exists()  # released at the end


@pytest.mark.slow
def test_two_runs_started_together_leave_one_whole_run(recipe, tmp_path):
    """The probe's race: two runs (seeds 1 and 2) into one new folder. Without a lock both exited 0 with their
    metrics interleaved, one config and one run's weights lost; now one trains, the other exits 2."""
    output = tmp_path / "run"
    runs = {seed: segmask_train(recipe, output, "--max-steps", "6", "--seed", str(seed)) for seed in (1, 2)}
    results = {seed: finish(process) for seed, process in runs.items()}
    winners = [seed for seed, (code, _, _) in results.items() if code == 0]
    assert len(winners) == 1, {seed: err[-1500:] for seed, (_, _, err) in results.items()}
    (winner,) = winners
    code, out, err = results[3 - winner]
    assert code == 2 and out == "" and err.count("\n") == 1, err[-2000:]
    assert "is in use by another run" in err or "already holds a run" in err
    assert logged_steps(output) == [1, 2, 3, 4, 5, 6]
    info = json.loads((output / RUN_FILE).read_text())
    assert info["train_config"]["seed"] == winner
    assert json.loads((output / train_output.RUN_CONFIG_FILE).read_text())["seed"] == winner
