"""`segmask.files.read_json`: the value of a JSON file, or an error that names the file and what is wrong."""

from __future__ import annotations

import pytest

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
