"""Run bookkeeping: predictions, accuracies with Wilson intervals, the journal of an unfinished run, results
files, and where they came from (the git commit, the machine).

    >>> from segmask.results import Prediction, score_predictions
    >>> scores = score_predictions([Prediction("boolq", 0, "prompt", "output", "true", "true")])
    >>> scores["boolq"].accuracy, round(scores["boolq"].ci_low, 3)
    (1.0, 0.207)

Every run, whatever its task format, ends the same way: a list of :class:`Prediction`, scored per task
(:func:`score_predictions`, :func:`run_results`) and written as ``<out>.json`` plus
``<out stem>.predictions.jsonl`` (:func:`write_results`), which :mod:`segmask.compare` reads.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segmask.files import write_text_atomic

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal


# ---------------------------------------------------------------------------------------------- stats


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion ``correct / n`` (95% for the default ``z``)."""
    if n <= 0:
        raise ValueError(f"need at least one trial, got n={n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, {n}], got {correct}")
    p = correct / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class Prediction:
    """One scored record. ``scores`` are the candidates' log-probabilities (``loglik`` scoring only);
    ``truncated`` the prompt tokens cut to fit the model's context (written only when some were)."""

    task: str
    index: int
    prompt: str
    output: str
    prediction: str | None
    gold: str
    scores: dict[str, float] | None = None
    truncated: int = 0

    @property
    def correct(self) -> bool:
        return self.prediction == self.gold

    def to_json(self) -> dict:
        row = asdict(self)
        if not self.truncated:
            del row["truncated"]
        return {**row, "correct": self.correct}


@dataclass(frozen=True)
class TaskScore:
    """Accuracy of one task with its 95% Wilson interval; unparseable answers count as wrong."""

    n: int
    correct: int
    unparseable: int
    accuracy: float = field(init=False)
    ci_low: float = field(init=False)
    ci_high: float = field(init=False)

    def __post_init__(self) -> None:
        low, high = wilson_interval(self.correct, self.n)
        object.__setattr__(self, "accuracy", self.correct / self.n)
        object.__setattr__(self, "ci_low", low)
        object.__setattr__(self, "ci_high", high)


def score_predictions(predictions: Sequence[Prediction]) -> dict[str, TaskScore]:
    """Per-task scores of a list of predictions, tasks in order of first appearance."""
    by_task: dict[str, list[Prediction]] = {}
    for prediction in predictions:
        by_task.setdefault(prediction.task, []).append(prediction)
    return {
        task: TaskScore(
            n=len(items),
            correct=sum(p.correct for p in items),
            unparseable=sum(p.prediction is None for p in items),
        )
        for task, items in by_task.items()
    }


def average_accuracy(scores: dict[str, TaskScore]) -> float:
    """The unweighted mean of the tasks' accuracies (each task counts once, whatever its size)."""
    if not scores:
        raise ValueError("no task scores to average")
    return sum(score.accuracy for score in scores.values()) / len(scores)


def run_results(
    predictions: Sequence[Prediction], run: Mapping[str, Any], files: Mapping[str, str] | None = None
) -> dict:
    """The results of a run as a results file holds them: the run's settings ``run`` (in their order), the
    git ``commit``, per-task scores (with the task's ``file`` when ``files`` is given) and the unweighted
    ``average``; tasks in order of first appearance in ``predictions``."""
    scores = score_predictions(predictions)
    tasks = {
        name: {**asdict(score), **({"file": files[name]} if files is not None else {})}
        for name, score in scores.items()
    }
    return {**run, "commit": git_commit(), "tasks": tasks, "average": average_accuracy(scores)}


# ---------------------------------------------------------------------------------------------- files


def journal_path(out: str | Path) -> Path:
    """``runs/a.json`` -> ``runs/a.partial.jsonl``, the predictions of an unfinished run."""
    out = Path(out)
    return out.with_name(f"{out.stem}.partial.jsonl")


class Journal:
    """The predictions of an unfinished run, one JSON line each after a header line of the run's arguments.

    Opening it with ``resume`` loads what an earlier, stopped run with the same header wrote (a last line cut
    by the stop is dropped); without ``resume`` the file starts over.
    """

    def __init__(self, path: str | Path, header: dict, resume: bool = True) -> None:
        self.path = Path(path)
        self.header = json.loads(json.dumps(header))  # as it reads back from the file
        self.done: dict[tuple[str, int], Prediction] = {}
        # errors="replace": a last line cut inside a character still reads, and is dropped below
        lines = (
            self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            if resume and self.path.exists()
            else []
        )
        if lines:
            try:
                found = json.loads(lines[0])
            except json.JSONDecodeError:
                found = None
            if found != self.header:
                raise ValueError(
                    f"{self.path} holds the predictions of a run with other arguments ({found}, now "
                    f"{self.header}); delete it or start over with resume=False (segmask eval --no-resume)"
                )
            for number, line in enumerate(lines[1:], start=2):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # the line the stop cut
                try:
                    row.pop("correct", None)
                    prediction = Prediction(**row)
                except (AttributeError, TypeError) as error:
                    raise ValueError(
                        f"{self.path}:{number}: not a prediction row ({error}); delete the file or start "
                        "over with resume=False (segmask eval --no-resume)"
                    ) from None
                self.done[(prediction.task, prediction.index)] = prediction
        rows = [self.header, *(p.to_json() for p in self.done.values())]
        write_text_atomic(self.path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self._handle = self.path.open("a", encoding="utf-8")
        self._added = 0

    def done_for(self, task: str, golds: Sequence[str] | None = None) -> dict[int, Prediction]:
        """The loaded predictions of ``task`` by record index. With ``golds`` (each record's answer), a
        prediction for another record (index out of range, other gold answer) is an error."""
        done = {index: p for (name, index), p in self.done.items() if name == task}
        for index, prediction in done.items():
            if golds is not None and (index >= len(golds) or golds[index] != prediction.gold):
                raise ValueError(
                    f"{self.path}: its prediction for {task} record {index} is for another record (the task "
                    "file changed?); delete it or start over with resume=False (segmask eval --no-resume)"
                )
        return done

    def close(self) -> None:
        """Close the file and keep it (a stopped run) if it holds a prediction; a run refused before its first
        prediction leaves no file behind."""
        self._handle.close()
        if not self.done and not self._added:
            self.path.unlink(missing_ok=True)

    def add(self, prediction: Prediction) -> None:
        self._handle.write(json.dumps(prediction.to_json(), ensure_ascii=False) + "\n")
        self._handle.flush()
        self._added += 1

    def finish(self) -> None:
        """Close and remove the file (the run's results are written)."""
        self._handle.close()
        self.path.unlink(missing_ok=True)


def check_out(out: str | Path, probe: bool = True) -> None:
    """Refuse (``ValueError``) a results path that cannot be written: a folder, one below a file, or (with
    ``probe``: a temporary file is made and removed there) one in a folder this user cannot write to."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"out {out} is a folder; give the results file's path (e.g. {out / 'results.json'})")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:  # the folders a run would create
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        if probe:
            with tempfile.TemporaryFile(dir=folder):  # written and gone
                pass
    except OSError as error:
        raise ValueError(f"cannot write results to {out}: {error.strerror or error}") from None


def predictions_path(out: str | Path) -> Path:
    """``runs/a.json`` -> ``runs/a.predictions.jsonl``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.predictions.jsonl")


def write_results(results: dict, predictions: Sequence[Prediction], out: str | Path) -> Path:
    """Write ``results`` as JSON to ``out`` and the predictions as JSONL beside it; return the JSONL path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = predictions_path(out)
    with jsonl.open("w", encoding="utf-8") as handle:
        for prediction in predictions:
            handle.write(json.dumps(prediction.to_json(), ensure_ascii=False) + "\n")
    out.write_text(json.dumps({**results, "predictions": jsonl.name}, indent=2) + "\n", encoding="utf-8")
    return jsonl


def git_commit() -> str | None:
    """The commit of the segmask checkout (``-dirty`` when it has local changes), or ``None`` outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def machine() -> dict:
    """Where a run ran: platform, CPU count, torch threads, load average, Python and torch versions."""
    import torch  # here, not at the top: compare (and its command) needs the statistics above, not torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
