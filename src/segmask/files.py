"""Files: reading the JSON files users hand to segmask (results, messages, records, task data), with errors
that name the file (a missing file, text that is not UTF-8, or text that is not JSON), writing files so
that a kill or a concurrent reader never sees half of one, refusing outputs that would overwrite inputs,
and the lock that keeps two processes out of one output folder."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
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


def check_outputs(outputs: Iterable[tuple[str, str | Path | None]], inputs: Iterable[str | Path]) -> None:
    """Refuse (``ValueError``, nothing written) to write where a command reads: an output that is one of the
    ``inputs`` (the same path, or the same file through a link), a folder output that holds one (a run
    folder whose ``--overwrite`` would delete it), or two outputs at one path.

    ``outputs`` are ``(name, path)`` pairs, the name being how the error calls the path (``"--out-md"``);
    a ``None`` path is an output not asked for. Every command that writes files checks here first.
    """
    written: dict[Path, str] = {}
    sources = [(Path(source), _real(source)) for source in inputs]
    for name, path in outputs:
        if path is None:
            continue
        target = _real(path)
        if target in written:
            raise ValueError(f"{written[target]} and {name} are the same file {path}; give each its own path")
        written[target] = name
        for source, real in sources:
            if real == target or _same_file(source, Path(path)):
                raise ValueError(f"{name} {path} is also an input; refusing to overwrite it")
            if target in real.parents:
                raise ValueError(f"{name} {path} holds the input {source}; keep inputs outside it")


def _real(path: str | Path) -> Path:
    """``path`` absolute, with links and ``..`` resolved (as far as it exists)."""
    return Path(os.path.expanduser(path)).resolve()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # a hard link has another path
    except OSError:
        return False


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` for the ``with`` block, or refuse
    (``ValueError``: "``what`` is in use by another run (process N)") while another process holds it.

    The file is created (an ``OSError`` where it cannot be) and holds the owner's pid; it is removed on
    release. The kernel drops the lock when its process dies, so a crash or a kill never leaves it held (the
    file a kill leaves is taken over by the next run).
    """
    import fcntl  # POSIX; imported here so that the rest of this module works everywhere

    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            by = f" (process {owner})" if owner.isdigit() else ""
            raise ValueError(f"{what} is in use by another run{by}; wait for it to end") from None
        try:  # the holder before us unlinks the file before it unlocks: lock the file at the path, or retry
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
