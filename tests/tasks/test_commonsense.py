"""segmask.tasks.commonsense: answer extraction, task files, candidates and the errors that name a bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segmask.tasks.commonsense import (
    TASK_LABELS,
    Task,
    available_tasks,
    extract,
    extract_answer,
    extract_answer_official,
    load_task,
)

ANSWERS = ("answer1", "answer2", "answer3", "answer4", "answer5")


# ---------------------------------------------------------------------------------- answer extraction


@pytest.mark.parametrize(
    "text, labels, expected",
    [
        ("the correct answer is answer2.", ANSWERS, "answer2"),  # trailing punctuation
        ("The correct answer is Answer3!", ANSWERS, "answer3"),  # capitals
        ("TRUE", ("true", "false"), "true"),
        ("False, because ...", ("true", "false"), "false"),
        ("answer4 or maybe answer1", ANSWERS, "answer4"),  # two candidates: the first one written
        ("not answer1 but answer2", ANSWERS, "answer1"),  # the protocol reads the first match, nothing more
        ("solution2: the second one", ("solution1", "solution2"), "solution2"),
        ("(option1)", ("option1", "option2"), "option1"),
        ("ending4\nending1", ("ending1", "ending2", "ending3", "ending4"), "ending4"),
        ("Once upon a time there was a girl", ANSWERS, None),  # none
        ("", ("true", "false"), None),
        ("that is untrue", ("true", "false"), None),  # no match inside a word
        ("answer12", ANSWERS, None),
        ("answer 1", ANSWERS, None),
    ],
)
def test_extract_answer(text, labels, expected):
    assert extract_answer(text, labels) == expected


# issue 17's table of real generations: (task, generation, official, strict)
EXTRACTOR_TABLE = [
    ("boolq", "untrue", "true", None),
    ("boolq", "True", None, "true"),
    ("ARC-Easy", "answer12", "answer1", None),
    ("social_i_qa", "the correct answer is answer4, not answer2", "answer4", "answer2"),
    ("social_i_qa", "answer2 or answer1", "answer2", "answer2"),
    ("boolq", "the correct answer is false", "false", "false"),
    ("piqa", "Solution2", None, "solution2"),
    ("winogrande", "option3option2", "option2", None),
    ("hellaswag", "", None, None),
]


@pytest.mark.parametrize("task, text, official, strict", EXTRACTOR_TABLE)
def test_official_and_strict_extractors(task, text, official, strict):
    assert extract_answer_official(text, task) == official
    assert extract(text, task, TASK_LABELS[task], "official") == official
    assert extract(text, task, TASK_LABELS[task], "strict") == strict
    assert extract(text, task, TASK_LABELS[task]) == strict  # strict stays the default


def test_official_extractor_reads_after_the_last_response_header():
    """As the official evaluate(): output.split("### Response:")[-1].strip() before the regex."""
    assert extract_answer_official("true ### Response:\n  false", "boolq") == "false"
    assert extract_answer_official("### Response: nothing", "boolq") is None


def test_official_extractor_outside_the_suite_uses_the_task_labels_in_order():
    assert extract_answer_official("pick B or A", "mytask", ("A", "B")) == "B"  # first match in the text
    assert extract_answer_official("AB", "mytask", ("A", "AB")) == "A"  # alternation order, as re does
    with pytest.raises(ValueError, match="not in the official suite and has no labels"):
        extract_answer_official("A", "mytask")


def test_unknown_extractor():
    with pytest.raises(ValueError, match=r"^unknown extractor 'loose'; expected one of official, strict$"):
        extract("true", "boolq", ("true", "false"), "loose")


# ------------------------------------------------------------------------------------------------ tasks


def _write(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def _record(answer="answer1", options=3):
    labels = "/".join(f"answer{i}" for i in range(1, options + 1))
    return {
        "instruction": f"Pick one.\n\nAnswer format: {labels}",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def test_task_files_and_candidates(tmp_path):
    _write(tmp_path / "ARC-Easy_test.json", [_record("answer3", 3), _record("answer5", 5)])
    _write(
        tmp_path / "mytask" / "test.json", [{"instruction": "q", "input": "", "output": "", "answer": "yes"}]
    )
    _write(tmp_path / "boolq_train.json", [])  # not a test file
    assert available_tasks(tmp_path) == ["ARC-Easy", "mytask"]
    task = load_task(tmp_path, "ARC-Easy")
    assert task.candidates == (("answer1", "answer2", "answer3"), ANSWERS)
    assert [r["answer"] for r in load_task(tmp_path, "ARC-Easy", limit=1).records] == ["answer3"]
    assert load_task(tmp_path, "mytask").labels == ("yes",)  # outside the suite: labels from the file


def test_bad_task_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="boolq_test.json.*available: none"):
        load_task(tmp_path, "boolq")
    path = _write(tmp_path / "openbookqa_test.json", [_record(), {"input": "", "answer": "answer1"}])
    with pytest.raises(
        ValueError, match=r"openbookqa_test.json: record 1: missing or empty string field 'instruction'"
    ):
        load_task(tmp_path, "openbookqa")
    _write(path, [_record(), _record(), _record("answer7", 3)])
    with pytest.raises(ValueError, match=r"openbookqa_test.json: record 2: answer 'answer7' is not one of"):
        load_task(tmp_path, "openbookqa")
    _write(path, [_record("answer4", 3)])  # the gold label is not among the offered options
    with pytest.raises(
        ValueError, match=r"record 0: answer 'answer4' is not one of \['answer1', 'answer2', 'answer3'\]"
    ):
        load_task(tmp_path, "openbookqa")
    _write(tmp_path / "boolq_test.json", [{**_record(), "instruction": "Yes or no?", "answer": "maybe"}])
    with pytest.raises(
        ValueError, match=r"boolq_test.json: record 0: answer 'maybe' is not one of \['true', 'false'\]"
    ):
        load_task(tmp_path, "boolq")
    (tmp_path / "piqa_test.json").write_text("{not json")
    with pytest.raises(ValueError, match="piqa_test.json: not valid JSON"):
        load_task(tmp_path, "piqa")


def test_task_dataclass_checks(tmp_path):
    with pytest.raises(ValueError, match="has no records"):
        Task("t", tmp_path / "t.json", (), ("a",), ())
