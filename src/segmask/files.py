"""Files: reading the JSON files users hand to segmask (results, messages, records, task data), with errors
that name the file (a missing file, text that is not UTF-8, or text that is not JSON), and writing files so
that a kill or a concurrent reader never sees half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | Path, what: str) -> Any:
    """The value in the JSON file ``path``; ``what`` names the file in the ``FileNotFoundError`` ("no {what}
    file PATH"). Text that is not UTF-8 or not JSON is a ``ValueError`` starting with the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` via a temporary file beside ``path`` and a rename: a kill never leaves a half-written
    file, and a concurrent reader sees the old file or the new one. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, value: Any) -> Path:
    """``value`` as indented JSON, written as :func:`write_text_atomic` does."""
    return write_text_atomic(path, json.dumps(value, indent=2) + "\n")
