"""The bAbI reader: literal parses, numbering restarts, errors that name the line, the shared en-10k files."""

from __future__ import annotations

from dataclasses import replace

import pytest

from segmask.tasks.babi import (
    answer_choices,
    group_by_story,
    parse_babi,
    read_story_questions,
    read_task,
    story_messages,
    task_file,
    with_choices,
)

TEXT = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Where is Daniel? \thallway\t4
1 Sandra travelled to the office.
2 Where is Sandra? \toffice\t1
"""


def test_parse_literal_text():
    questions = parse_babi(TEXT)
    assert [(q.sentences, q.question, q.answer, q.supporting) for q in questions] == [
        (("Mary moved to the bathroom.", "John went to the hallway."), "Where is Mary?", "bathroom", (1,)),
        (
            ("Mary moved to the bathroom.", "John went to the hallway.", "Daniel went back to the hallway."),
            "Where is Daniel?",
            "hallway",
            (4,),
        ),
        (("Sandra travelled to the office.",), "Where is Sandra?", "office", (1,)),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Mary moved to the bathroom.\n", r"<text>:1: expected '<id> <text>'"),
        ("1 Mary moved.\n2 Where is Mary?\tkitchen\n", r"<text>:2: expected 'question<TAB>answer"),
        ("1 Mary moved.\n2 Where is Mary?\t\t1\n", r"<text>:2: expected 'question<TAB>answer"),
        ("1 Mary moved.\n", "no questions"),
    ],
)
def test_malformed_text_names_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_babi(text)


def test_task_file_errors(tmp_path):
    with pytest.raises(ValueError, match="1..20"):
        task_file(tmp_path, 21, "train")
    with pytest.raises(ValueError, match="split"):
        task_file(tmp_path, 1, "dev")
    with pytest.raises(FileNotFoundError, match="qa1_"):
        task_file(tmp_path, 1, "train")


def test_reads_a_task_folder(tmp_path):
    (tmp_path / "qa1_single-supporting-fact_train.txt").write_text(TEXT)
    (tmp_path / "qa1_single-supporting-fact_test.txt").write_text(
        "1 Bill went to the garden.\n2 Where is Bill?\tgarden\t1\n"
    )
    assert answer_choices(tmp_path, 1) == ("bathroom", "garden", "hallway", "office")
    stories = read_task(tmp_path, 1, "train", limit=2)
    assert [s.answer for s in stories] == ["bathroom", "hallway"]
    assert (
        stories[1].text
        == "Mary moved to the bathroom.\nJohn went to the hallway.\nDaniel went back to the hallway."
    )
    assert all(s.choices == ("bathroom", "garden", "hallway", "office") for s in stories)
    assert with_choices(stories, ("bathroom", "hallway"))[0].choices == ("bathroom", "hallway")
    with pytest.raises(ValueError, match="limit"):
        read_task(tmp_path, 1, "train", limit=0)


def test_shared_en10k_task1(babi_dir):
    folder = babi_dir / "en-10k"
    test = read_task(folder, 1, "test")
    assert len(test) == 1000
    first = task_file(folder, 1, "test").read_text().splitlines()[:3]
    assert test[0].sentences == tuple(line.split(" ", 1)[1] for line in first[:2])
    assert test[0].question == "Where is John?" and test[0].answer == first[2].split("\t")[1]
    assert answer_choices(folder, 1) == ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
    assert len(read_task(folder, 1, "train")) == 10_000


def test_shared_en10k_task3_has_no_train_split_but_has_choices(babi_dir):
    folder = babi_dir / "en-10k"
    with pytest.raises(FileNotFoundError):
        read_task(folder, 3, "train")
    assert len(answer_choices(folder, 3)) == 6


def test_questions_know_their_story():
    assert [q.story for q in parse_babi(TEXT)] == [0, 0, 1]
    stories = group_by_story(parse_babi(TEXT))
    assert [[q.answer for q in story] for story in stories] == [["bathroom", "hallway"], ["office"]]


def test_story_messages_literal():
    first, _ = group_by_story(parse_babi(TEXT))
    assert story_messages(first) == [
        {"role": "user", "content": "Mary moved to the bathroom.\nJohn went to the hallway."},
        {"role": "user", "content": "Where is Mary?"},
        {"role": "assistant", "content": "bathroom"},
        {"role": "user", "content": "Daniel went back to the hallway."},
        {"role": "user", "content": "Where is Daniel?"},
        {"role": "assistant", "content": "hallway"},
    ]
    assert story_messages(first, merge_turns=True, include_last_answer=False) == [
        {"role": "user", "content": "Mary moved to the bathroom.\nJohn went to the hallway.\nWhere is Mary?"},
        {"role": "assistant", "content": "bathroom"},
        {"role": "user", "content": "Daniel went back to the hallway.\nWhere is Daniel?"},
    ]


def test_story_messages_without_new_statements_and_errors():
    text = "1 Mary moved to the office.\n2 Where is Mary?\toffice\t1\n3 Where is Mary?\toffice\t1\n"
    story = parse_babi(text)
    assert [m["content"] for m in story_messages(story)] == [
        "Mary moved to the office.",
        "Where is Mary?",
        "office",
        "Where is Mary?",
        "office",
    ]
    with pytest.raises(ValueError, match="more than one story"):
        story_messages(parse_babi(TEXT))
    with pytest.raises(ValueError, match="at least one"):
        story_messages([])
    first, second = story
    with pytest.raises(ValueError, match="question 1's statements do not extend"):
        story_messages([first, replace(second, sentences=("John went to the garden.",))])


def test_read_story_questions_shared(babi_dir):
    stories = read_story_questions(babi_dir / "en-10k", 1, "test")
    assert len(stories) == 200 and all(len(story) == 5 for story in stories)
    assert sum(len(story) for story in stories) == 1000
    assert [len(s) for s in read_story_questions(babi_dir / "en-10k", 1, "train", limit=7)] == [5, 2]
