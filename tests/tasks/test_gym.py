"""reasoning-gym items as passage + question records: the split, the layouts, seeded disjoint draws."""

from __future__ import annotations

import re

import pytest

from segmask.tasks.commonsense import check_record
from segmask.tasks.gym import GymItem, item_key, split_item, to_record, train_test_split

ENTRY = {
    "question": "Jayden is married to Elizabeth. They have a child called Edward.\n\n"
    "What relation is Edward to Elizabeth? Answer with a single word.",
    "answer": "son",
}


def test_split_cuts_at_the_last_blank_line():
    item = split_item(ENTRY)
    assert item == GymItem(
        "Jayden is married to Elizabeth. They have a child called Edward.",
        "What relation is Edward to Elizabeth? Answer with a single word.",
        "son",
    )
    two = split_item({"question": "A.\n\nB.\n\nWhat is C?", "answer": " x "})
    assert (two.passage, two.question, two.answer) == ("A.\n\nB.", "What is C?", "x")


@pytest.mark.parametrize("text", ["What is Edward to Elizabeth?", "\n\nWhat is Edward to Elizabeth?"])
def test_an_item_without_a_passage_is_refused(text):
    with pytest.raises(ValueError, match="passage and a question"):
        split_item({"question": text, "answer": "son"})
    with pytest.raises(ValueError, match="answer"):
        GymItem("passage", "question?", " ")


def test_records_in_both_layouts_hold_the_same_words(tmp_path):
    item = split_item(ENTRY)
    after, first = to_record(item), to_record(item, question_first=True)
    assert after == {
        "instruction": "Read the text and answer the question.\n\nJayden is married to Elizabeth. They have a "
        "child called Edward.\n\nQuestion: What relation is Edward to Elizabeth? Answer with a single word.",
        "input": "",
        "output": "the correct answer is son",
        "answer": "son",
    }
    assert first["instruction"].index("Question:") < first["instruction"].index("Jayden")
    assert sorted(after["instruction"].split("\n\n")) == sorted(first["instruction"].split("\n\n"))
    check_record(after, tmp_path, 0)
    check_record(first, tmp_path, 0)


def test_family_relationships_draw_is_seeded_disjoint_and_split():
    pytest.importorskip("reasoning_gym")
    train, held_out = train_test_split("family_relationships", 60, 30, seed=0)
    assert (train, held_out) == train_test_split("family_relationships", 60, 30, seed=0)
    assert train != train_test_split("family_relationships", 60, 30, seed=1)[0]
    assert len({item_key(i) for i in train}) == 60 and len({item_key(i) for i in held_out}) == 30
    assert not {item_key(i) for i in train} & {item_key(i) for i in held_out}
    for item in train + held_out:
        assert "\n\n" not in item.passage and " is married to " in item.passage
        assert re.match(r"(What|How)\b.*\?", item.question) and item.answer.isascii()
    # the answer vocabulary is a dozen relations, not one
    assert len({i.answer for i in train}) >= 6
    config = {"min_family_size": 9, "max_family_size": 9}
    bigger = train_test_split("family_relationships", 5, 1, seed=0, config=config)[0]
    assert all(item.passage.count(".") >= 5 for item in bigger)
    with pytest.raises(ValueError, match="max_family_size must be >= min_family_size"):
        train_test_split("family_relationships", 5, 1, seed=0, config={"min_family_size": 9})
    with pytest.raises(ValueError, match="no_such_task"):
        train_test_split("no_such_task", 5, 1, seed=0)


def test_missing_package_is_a_value_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gym(name, *args, **kwargs):
        if name == "reasoning_gym":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gym)
    with pytest.raises(ValueError, match="pip install reasoning-gym==0.1.25"):
        train_test_split("family_relationships", 1, 1, seed=0)
