"""`segmask.files`: read_json (the value of a JSON file, or an error naming the file) and atomic writes."""

from __future__ import annotations

import json

import pytest

from segmask import files
from segmask.files import read_json


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
