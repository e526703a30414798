"""The commonsense suite's task format (LLM-Adapters): records, answer vocabularies, candidates, answers.

    >>> from segmask.tasks.commonsense import extract_answer
    >>> extract_answer("The correct answer is Answer2.", ("answer1", "answer2"))
    'answer2'

A task is a JSON list of records ``{"instruction", "input", "output", "answer"}`` in ``DIR/<task>_test.json``
or ``DIR/<task>/test.json``; ``answer`` is a label of the task's answer vocabulary (``true``/``false``,
``answer1``..``answer5``, ...). A record's ``Answer format: a/b/c`` line names the labels it offers. The
training target is ``ANSWER_PREFIX + label``: :func:`answer_continuation` gives its tokens for the ``loglik``
scoring of :mod:`segmask.scoring`, :func:`extract` reads a label back from generated text with segmask's
``strict`` extractor (:func:`extract_answer`) or the paper's ``official`` one (:func:`extract_answer_official`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from segmask.files import read_json
from segmask.segments import Encoded, encode_instruction

# the answer vocabulary of each task of the suite (LLM-Adapters' label strings)
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}
SUITE: tuple[str, ...] = tuple(TASK_LABELS)
ANSWER_PREFIX = "the correct answer is "  # the training target is ANSWER_PREFIX + label

_FORMAT_LINE = re.compile(r"Answer format:\s*(\S+)")


# --------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """One task: its records and answer vocabulary. ``candidates[i]`` are the labels record ``i`` offers;
    ``duplicates`` the repeated records of the file that :func:`load_task` left out."""

    name: str
    path: Path
    records: tuple[dict, ...]
    labels: tuple[str, ...]
    candidates: tuple[tuple[str, ...], ...]
    duplicates: int = 0

    def __post_init__(self) -> None:
        if not self.records:
            raise ValueError(f"{self.path}: task {self.name!r} has no records")
        if len(self.candidates) != len(self.records):
            raise ValueError(
                f"{self.path}: {len(self.candidates)} candidate lists for {len(self.records)} records"
            )


def task_path(data_dir: str | Path, name: str) -> Path:
    """``DIR/<name>_test.json`` or ``DIR/<name>/test.json``; a ``FileNotFoundError`` lists what exists."""
    data_dir = Path(data_dir)
    for path in (data_dir / f"{name}_test.json", data_dir / name / "test.json"):
        if path.is_file():
            return path
    found = ", ".join(available_tasks(data_dir)) if data_dir.is_dir() else f"{data_dir} is not a directory"
    raise FileNotFoundError(
        f"no test file for task {name!r}: looked for {data_dir / f'{name}_test.json'} and "
        f"{data_dir / name / 'test.json'} (available: {found or 'none'})"
    )


def available_tasks(data_dir: str | Path) -> list[str]:
    """Names of the tasks with a test file in ``data_dir``."""
    data_dir = Path(data_dir)
    names = [p.name.removesuffix("_test.json") for p in data_dir.glob("*_test.json")]
    names += [p.parent.name for p in data_dir.glob("*/test.json")]
    return sorted(set(names))


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"boolq,piqa"`` or ``["boolq", "piqa"]`` to a list of unique names, in order."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError("no tasks given")
    return list(dict.fromkeys(names))


def load_task(data_dir: str | Path, name: str, limit: int | None = None) -> Task:
    """Read and validate a task's first ``limit`` distinct records (all when ``None``).

    A record that repeats an earlier one (:func:`distinct_records`: same instruction, input and answer) is
    counted once: it is left out, and ``Task.duplicates`` says how many were (the results of
    :func:`segmask.evaluation.evaluate` report it per task). Scoring a repeat again would add no evidence
    but count it twice, narrowing the interval (the suite's own ``social_i_qa_test.json`` repeats 19 of
    its 1,954 records). A record's index in ``Task.records`` (and in the predictions) counts the records kept.

    Raises a ``ValueError`` naming the file and the record's position in it for a malformed record or an
    answer outside the task's vocabulary, and a ``FileNotFoundError`` for a missing file.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    path = task_path(data_dir, name)
    records = read_json(path, "task")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for index, record in enumerate(records):
        check_record(record, path, index)
    labels = TASK_LABELS.get(name) or _labels_from_records(records)
    kept, duplicates = distinct_records(records, limit)
    candidates = tuple(record_candidates(records[index], labels, path, index) for index in kept)
    return Task(name, path, tuple(records[index] for index in kept), labels, candidates, duplicates)


def distinct_records(records: Sequence[dict], limit: int | None = None) -> tuple[list[int], int]:
    """The positions of the first ``limit`` records (all when ``None``) that repeat no earlier one, and how
    many repeats were passed over on the way. Two records are the same test item when their
    ``instruction``, ``input`` and ``answer`` agree: the same prompt with the same gold label (the same
    prompt with another label stays, a record of its own)."""
    kept: list[int] = []
    seen: set[tuple[str, str, str]] = set()
    repeats = 0
    for index, record in enumerate(records):
        if limit is not None and len(kept) == limit:
            break
        key = (record["instruction"], record.get("input") or "", record["answer"])
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        kept.append(index)
    return kept, repeats


def check_record(record: Any, path: Path, index: int) -> None:
    """Raise a ``ValueError`` naming ``path`` and ``index`` unless ``record`` is an LLM-Adapters record."""
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    for key in ("instruction", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"{where}: missing or empty string field {key!r}")
    for key in ("input", "output"):
        if not isinstance(record.get(key, ""), str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")


def record_candidates(record: dict, labels: tuple[str, ...], path: Path, index: int) -> tuple[str, ...]:
    """The labels a record offers: its ``Answer format: a/b/c`` line, else the task's whole vocabulary.

    ARC questions have 3 to 5 options; scoring only the offered ones keeps ``loglik`` from choosing an
    option that does not exist.
    """
    where = f"{path}: record {index}"
    found = _FORMAT_LINE.findall(record["instruction"])
    offered = tuple(found[-1].split("/")) if found else labels
    unknown = [label for label in offered if label not in labels]
    if unknown:
        raise ValueError(f"{where}: answer format lists {unknown}, not in the task's labels {list(labels)}")
    if record["answer"] not in offered:
        raise ValueError(f"{where}: answer {record['answer']!r} is not one of {list(offered)}")
    return offered


def _labels_from_records(records: list[dict]) -> tuple[str, ...]:
    """Vocabulary of a task outside the suite: every label named in an answer-format line or as an answer."""
    labels: dict[str, None] = {}
    for record in records:
        for line in _FORMAT_LINE.findall(record["instruction"]):
            labels.update(dict.fromkeys(line.split("/")))
        labels[record["answer"]] = None
    return tuple(labels)


def extract_answer(text: str, labels: Sequence[str]) -> str | None:
    """The ``strict`` extractor (segmask's; see :func:`extract_answer_official` for the paper's): the first
    label of ``labels`` that occurs in ``text`` as a whole word, case-insensitive, else ``None``.

    ``"The correct answer is Answer2."`` gives ``"answer2"``; ``"answer1 or answer3"`` gives ``"answer1"``;
    ``"untrue"`` contains no ``"true"``.
    """
    if not labels:
        raise ValueError("extract_answer needs at least one label")
    by_lower = {label.lower(): label for label in labels}
    alternatives = "|".join(re.escape(label) for label in sorted(by_lower, key=len, reverse=True))
    match = re.search(rf"(?<![0-9a-z_])({alternatives})(?![0-9a-z_])", text.lower())
    return None if match is None else by_lower[match.group(1)]


Extractor = Literal["official", "strict"]
EXTRACTORS: tuple[str, ...] = get_args(Extractor)
#: the official extractor's alternatives per task, in its order (``extract_answer`` of LLM-Adapters
#: ``commonsense_evaluate.py``, copied unchanged into DoRA's and the MAS repo's): Social IQa, ARC and
#: OpenBookQA all take answer1..answer5
OFFICIAL_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    **dict.fromkeys(
        ("social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa"),
        ("answer1", "answer2", "answer3", "answer4", "answer5"),
    ),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
}


def extract_answer_official(text: str, task: str, labels: Sequence[str] = ()) -> str | None:
    """The official extractor exactly: the first match of ``label1|label2|...`` (case-sensitive, no word
    boundary) in the text after the last ``### Response:``, stripped; ``None`` where it finds none (the
    official code returns ``""``, counted wrong).

    Reproduces ``extract_answer`` of AGI-Edgerunners/LLM-Adapters ``commonsense_evaluate.py`` (the MAS
    repo's ``commonsense/commonsense_evaluate.py`` and NVlabs/DoRA's are the same) after its
    ``output.split("### Response:")[-1].strip()``. A task of the official suite uses its official
    alternatives (:data:`OFFICIAL_LABELS`: Social IQa takes answer1..answer5); any other task its
    ``labels``, in their order. ``"untrue"`` gives ``"true"``, ``"True"`` nothing, ``"answer12"``
    ``"answer1"``.
    """
    alternatives = OFFICIAL_LABELS.get(task) or tuple(labels)
    if not alternatives:
        raise ValueError(
            f"extract_answer_official: task {task!r} is not in the official suite and has no labels"
        )
    match = re.search("|".join(map(re.escape, alternatives)), text.split("### Response:")[-1].strip())
    return None if match is None else match.group(0)


def extract(text: str, task: str, labels: Sequence[str], extractor: str = "strict") -> str | None:
    """The label a generation names, read by ``extractor``: ``strict`` (:func:`extract_answer`: whole word,
    case-insensitive, the task's labels) or ``official`` (:func:`extract_answer_official`)."""
    if extractor == "official":
        return extract_answer_official(text, task, labels)
    if extractor == "strict":
        return extract_answer(text, labels)
    raise ValueError(f"unknown extractor {extractor!r}; expected one of {', '.join(EXTRACTORS)}")


def answer_continuation(
    tokenizer, record: dict, label: str, policy: str, prompt: Encoded, causal_sink: bool | None = None
) -> list[int]:
    """Token ids of ``ANSWER_PREFIX + label`` after ``prompt``, exactly as training would see them
    (``causal_sink`` as the prompt was encoded: :func:`segmask.segments.sink_segments`)."""
    full = encode_instruction(
        tokenizer,
        {**record, "output": ANSWER_PREFIX + label, "answer": label},
        policy=policy,
        include_answer=True,
        causal_sink=causal_sink,
    )
    cut = len(prompt.input_ids)
    if full.input_ids[:cut] != prompt.input_ids:
        raise ValueError("the prompt's tokens are not a prefix of the prompt-plus-answer tokens")
    if any(segment != -1 for segment in full.segment_ids[cut:]):
        raise ValueError("answer tokens must be causal (segment id -1)")
    return full.input_ids[cut:]
