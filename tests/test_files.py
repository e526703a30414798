"""`segmask.files`: read_json (the value of a JSON file, or an error naming the file), atomic writes, outputs
that would overwrite inputs, and the exclusive lock of an output folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from segmask import files
from segmask.files import check_outputs, read_json


def test_read_json_value_and_errors(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"tasks": [1, 2]}', encoding="utf-8")
    assert read_json(path, "results") == {"tasks": [1, 2]}
    with pytest.raises(FileNotFoundError, match="no results file .*missing.json"):
        read_json(tmp_path / "missing.json", "results")
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"run.json: not valid JSON \("):
        read_json(path, "results")
    path.write_bytes(b'["\xff"]')
    with pytest.raises(ValueError, match=r"run.json: not UTF-8 text \("):
        read_json(path, "results")


def test_atomic_writes_replace_whole_files_and_leave_no_temporary(tmp_path):
    target = tmp_path / "new" / "run.json"
    files.write_json_atomic(target, {"step": 1})
    assert json.loads(target.read_text()) == {"step": 1}
    files.write_text_atomic(target, "replaced\n")
    assert target.read_text() == "replaced\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.json"]


def test_an_output_that_is_an_input_is_refused(tmp_path):
    """The same path, another spelling, a symbolic or hard link, a folder output holding an input, and two
    outputs at one path are refused; distinct paths (and outputs not asked for) pass."""
    data = tmp_path / "a.json"
    data.write_text("{}")
    (tmp_path / "sym.json").symlink_to(data)
    os.link(data, tmp_path / "hard.json")
    same = [data, tmp_path / "sub" / ".." / "a.json", tmp_path / "sym.json", tmp_path / "hard.json"]
    for path in same:
        with pytest.raises(ValueError, match=f"--out-md {re.escape(str(path))} is also an input; refusing"):
            check_outputs([("--out-md", path)], [data])
    with pytest.raises(ValueError, match=f"output {re.escape(str(tmp_path))} holds the input .*a.json; keep"):
        check_outputs([("output", tmp_path)], [data])
    with pytest.raises(ValueError, match="--out-md and --out-png are the same file"):
        check_outputs([("--out-md", tmp_path / "t.md"), ("--out-png", tmp_path / "t.md")], [data])
    check_outputs([("--out-md", tmp_path / "t.md"), ("--out-png", None)], [data, tmp_path / "missing.json"])
    check_outputs([("output", tmp_path / "run")], [data])  # a folder beside the input


def test_a_held_lock_refuses_a_second_holder_until_released(tmp_path):
    """flock is per open file: a second open in the same process is refused as another process would be."""
    lock = tmp_path / ".lock"
    with files.exclusive_lock(lock, "output run"):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(
            ValueError, match=rf"^output run is in use by another run \(process {os.getpid()}\)"
        ):
            with files.exclusive_lock(lock, "output run"):
                pass
    assert not lock.exists()  # released and removed
    with files.exclusive_lock(lock, "output run"):
        pass


def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    """The kernel releases the lock of a process killed with SIGKILL; its stale file is taken over."""
    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ValueError, match=rf"in use by another run \(process {holder.pid}\)"):
            with files.exclusive_lock(lock, "output run"):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert lock.exists()  # no clean-up ran
    with files.exclusive_lock(lock, "output run"):
        assert lock.read_text() == f"{os.getpid()}\n"


HOLD = """
import sys, time
from segmask.files import exclusive_lock
with exclusive_lock(sys.argv[1], "output run"):
    print("held", flush=True)
    time.sleep(600)
"""
