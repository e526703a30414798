"""The built-in reading task: seeded, correct answers, disjoint splits, LLM-Adapters and chat exports."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from segmask.tasks.commonsense import check_record, record_candidates
from segmask.tasks.reading import (
    ANSWER_PREFIX,
    OBJECTS,
    PEOPLE,
    PLACES,
    ReadingTask,
    Story,
    generate_stories,
    story_key,
    to_messages,
    to_record,
    train_test_split,
    write_json,
    write_jsonl,
)

SENTENCE = re.compile(r"^(\w+) (?:went to|moved to|travelled to|journeyed to|went back to) the (\w+)\.$")
PICKUP = re.compile(r"^(\w+) picked up the (\w+)\.$")
HARD = ReadingTask(people=PEOPLE, min_sentences=6, max_sentences=10, pickups=2, two_hop=True)
TEMPLATES = Path(__file__).parents[1] / "fixtures" / "chat_templates"


def last_place(story: Story) -> str:
    """The reference answer, re-derived from the text: the place of the asked person's last move."""
    person = re.fullmatch(r"Where is (\w+)\?", story.question).group(1)
    places = [m.group(2) for m in map(SENTENCE.match, story.sentences) if m.group(1) == person]
    return places[-1]


def test_same_seed_same_stories_and_other_seed_differs():
    assert generate_stories(20, seed=3) == generate_stories(20, seed=3)
    assert generate_stories(20, seed=3) != generate_stories(20, seed=4)


def test_answer_is_the_asked_persons_last_place():
    task = ReadingTask(min_sentences=2, max_sentences=8)
    stories = generate_stories(300, seed=1, task=task)
    for story in stories:
        assert all(SENTENCE.match(sentence) for sentence in story.sentences), story.sentences
        assert task.min_sentences <= len(story.sentences) <= task.max_sentences
        assert story.answer == last_place(story)
    # the task needs reading: the answer is often not the place of the last sentence
    last_sentence_place = sum(SENTENCE.match(s.sentences[-1]).group(2) == s.answer for s in stories)
    assert last_sentence_place < 0.6 * len(stories)
    # every place occurs as an answer
    assert {s.answer for s in stories} == set(PLACES)


def test_nobody_moves_to_where_they_are():
    for story in generate_stories(200, seed=2):
        where: dict[str, str] = {}
        for sentence in story.sentences:
            person, place = SENTENCE.match(sentence).groups()
            assert where.get(person) != place
            where[person] = place


def test_train_and_held_out_are_disjoint_and_distinct():
    train, held_out = train_test_split(400, 100, seed=0)
    assert len(train) == 400 and len(held_out) == 100
    train_keys = {story_key(s) for s in train}
    held_keys = {story_key(s) for s in held_out}
    assert len(train_keys) == 400 and len(held_keys) == 100
    assert not train_keys & held_keys


def test_too_small_a_task_is_refused():
    tiny = ReadingTask(people=("Mary",), places=("kitchen", "garden"), min_sentences=1, max_sentences=1)
    # one person, one sentence: 5 verbs x 2 places = 10 possible stories
    assert len(generate_stories(10, seed=0, task=tiny)) == 10
    with pytest.raises(ValueError, match="distinct stories"):
        generate_stories(11, seed=0, task=tiny)


def test_default_task_draws_the_stories_it_drew_before_the_difficulty_knob():
    """The knob leaves the original task draw for draw (hash of 200 stories from the code before it)."""
    digest = hashlib.sha256(repr(generate_stories(200, seed=7)).encode()).hexdigest()
    assert digest == "863cb71545b752f13c5db43940c3e36a0d63bee4ccf2159762a7e46dabade858"
    assert generate_stories(200, seed=7) == generate_stories(200, seed=7, task=ReadingTask(pickups=0))


def two_hop_answer(story: Story) -> str:
    """The reference answer of a two-hop story, from the text: where the object's holder went last."""
    thing = re.fullmatch(r"Where is the (\w+)\?", story.question).group(1)
    [holder] = [m.group(1) for m in map(PICKUP.match, story.sentences) if m and m.group(2) == thing]
    return [m.group(2) for m in map(SENTENCE.match, story.sentences) if m and m.group(1) == holder][-1]


def test_two_hop_answer_is_where_the_holder_went_last():
    stories = generate_stories(400, seed=3, task=HARD)
    for story in stories:
        moves = [m for m in map(SENTENCE.match, story.sentences) if m]
        pickups = [m for m in map(PICKUP.match, story.sentences) if m]
        assert len(moves) + len(pickups) == len(story.sentences)
        assert HARD.min_sentences <= len(moves) <= HARD.max_sentences and len(pickups) == HARD.pickups
        assert len({m.group(2) for m in pickups}) == HARD.pickups  # each object picked up once
        assert {m.group(2) for m in pickups} <= set(OBJECTS)
        assert {m.group(1) for m in pickups} <= {m.group(1) for m in moves}  # holders move
        assert story.answer == two_hop_answer(story)
    # two look-ups needed: the answer is often neither the last sentence's place nor where the holder was
    # when the object was picked up
    last = sum(SENTENCE.match(s.sentences[-1]) is not None and s.answer in s.sentences[-1] for s in stories)
    assert last < 0.4 * len(stories)
    assert {s.answer for s in stories} == set(PLACES)
    assert len({s.question for s in stories}) == len(OBJECTS)


def test_a_two_hop_fraction_mixes_both_questions_and_keeps_the_all_two_hop_draw():
    mixed = ReadingTask(min_sentences=4, max_sentences=7, pickups=2, two_hop=0.5)
    stories = generate_stories(400, seed=5, task=mixed)
    objects = [s for s in stories if s.question.startswith("Where is the ")]
    assert 150 < len(objects) < 250
    for story in stories:
        plain = Story(tuple(s for s in story.sentences if SENTENCE.match(s)), story.question, story.answer)
        assert story.answer == (two_hop_answer(story) if story in objects else last_place(plain))
    # two_hop=1 draws exactly what two_hop=True drew (no extra draw for the question type)
    assert generate_stories(50, 1, ReadingTask(pickups=2, two_hop=1.0)) == generate_stories(
        50, 1, ReadingTask(pickups=2, two_hop=True)
    )


def test_pickups_without_two_hop_are_distractors_for_a_question_about_a_person():
    task = ReadingTask(pickups=2)
    for story in generate_stories(200, seed=4, task=task):
        assert sum(PICKUP.match(s) is not None for s in story.sentences) == 2
        plain = Story(tuple(s for s in story.sentences if SENTENCE.match(s)), story.question, story.answer)
        assert story.answer == last_place(plain)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pickups": 7}, "pickups"),
        ({"pickups": -1}, "pickups"),
        ({"two_hop": True}, "two_hop"),
        ({"two_hop": 1.5, "pickups": 1}, "fraction"),
        ({"objects": ("key", "key"), "pickups": 1}, "objects"),
        ({"people": ()}, "people"),
        ({"people": ("Mary", "Mary")}, "people"),
        ({"places": ("kitchen",)}, "places"),
        ({"min_sentences": 4, "max_sentences": 3}, "min_sentences"),
        ({"min_sentences": 0}, "min_sentences"),
    ],
)
def test_bad_task_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReadingTask(**kwargs)


def test_story_validates_its_answer():
    with pytest.raises(ValueError, match="not one of the choices"):
        Story(("Mary went to the kitchen.",), "Where is Mary?", "moon")
    with pytest.raises(ValueError, match="at least one sentence"):
        Story((), "Where is Mary?", "kitchen")


def test_record_is_an_llm_adapters_record_the_evaluator_accepts(tmp_path):
    story = Story(("Mary went to the kitchen.", "John moved to the garden."), "Where is Mary?", "kitchen")
    record = to_record(story)
    assert record == {
        "instruction": "Read the story and answer the question.\n\nMary went to the kitchen.\nJohn moved to the "
        "garden.\n\nQuestion: Where is Mary?\n\nAnswer format: kitchen/garden/office/bathroom/hallway/bedroom",
        "input": "",
        "output": "the correct answer is kitchen",
        "answer": "kitchen",
    }
    check_record(record, tmp_path, 0)
    assert record_candidates(record, PLACES, tmp_path, 0) == PLACES
    assert "Answer format" not in to_record(story, answer_format=False)["instruction"]
    path = write_json([record], tmp_path / "reading_test.json")
    assert json.loads(path.read_text()) == [record]


def test_question_first_record_has_the_same_words_in_the_other_order():
    story = Story(("Mary went to the kitchen.", "John moved to the garden."), "Where is Mary?", "kitchen")
    after, first = to_record(story, answer_format=False), to_record(story, False, question_first=True)
    assert first["instruction"] == (
        "Read the story and answer the question.\n\nQuestion: Where is Mary?\n\nMary went to the kitchen.\n"
        "John moved to the garden."
    )
    assert sorted(after["instruction"].split("\n")) == sorted(first["instruction"].split("\n"))
    assert {k: v for k, v in after.items() if k != "instruction"} == {
        k: v for k, v in first.items() if k != "instruction"
    }
    assert to_record(story) == to_record(story, question_first=False)  # the default layout is unchanged


def test_messages_and_jsonl(tmp_path):
    story = generate_stories(1, seed=5)[0]
    messages = to_messages(story, answer_prefix=ANSWER_PREFIX)
    assert [m["role"] for m in messages] == ["user", "user", "assistant"]
    assert messages[0]["content"] == story.text and messages[1]["content"] == story.question
    assert messages[2]["content"] == ANSWER_PREFIX + story.answer
    assert len(to_messages(story, include_answer=False)) == 2
    path = write_jsonl([messages, messages], tmp_path / "train.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"messages": messages}] * 2


def test_chat_export_puts_story_and_question_in_two_segments(stories_path):
    """Under mas the story and the question are two segments; under prefix one; the answer stays causal."""
    from transformers import AutoTokenizer

    from segmask.segments import encode_chat

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    template = (TEMPLATES / "chatml_smollm2.jinja").read_text(encoding="utf-8")
    story = generate_stories(1, seed=random.Random(0).randint(0, 99))[0]
    messages = to_messages(story)
    mas = encode_chat(tokenizer, messages, policy="mas", chat_template=template)
    prefix = encode_chat(tokenizer, messages, policy="prefix", chat_template=template)
    assert mas.input_ids == prefix.input_ids

    def text_of(encoded, segment):
        return tokenizer.decode([t for t, s in zip(encoded.input_ids, encoded.segment_ids) if s == segment])

    assert story.sentences[-1] in text_of(mas, 0) and story.question not in text_of(mas, 0)
    assert story.question in text_of(mas, 1) and story.sentences[0] not in text_of(mas, 1)
    assert set(mas.segment_ids) == {0, 1, -1} and set(prefix.segment_ids) == {0, -1}
    # token 0 (the sink) is causal under mas by default, not under prefix; past it, the same prompt tokens
    assert (mas.segment_ids[0], prefix.segment_ids[0]) == (-1, 0)
    assert [s for s in prefix.segment_ids[1:] if s >= 0] == [0] * sum(s >= 0 for s in mas.segment_ids)
    assert story.answer in tokenizer.decode([t for t in mas.labels if t != -100])
