"""Reading the JSON files users hand to segmask (results, messages, records, task data), with errors that name
the file: a missing file, text that is not UTF-8, or text that is not JSON."""

from __future__ import annotations

import json
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
