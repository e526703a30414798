"""A built-in reading task in the spirit of bAbI task 1: people move between places, then a question.

    >>> from segmask.tasks.reading import generate_stories, to_record
    >>> story = generate_stories(1, seed=0)[0]
    >>> story.question, story.answer in story.choices
    ('Where is Daniel?', True)

Every story is drawn from a seeded ``random.Random``, so the same seed always gives the same stories and
nothing is downloaded. A story is a few sentences ``"<person> <verb> the <place>."``; the question asks
where one of the people who moved is now, and the answer is the place of that person's *last* move, so
earlier moves of the same person are distractors. Chance accuracy is ``1 / len(places)``.

The difficulty knob (:class:`ReadingTask`; the defaults draw exactly the stories above): more ``people``,
``places`` and sentences, ``pickups`` sentences ``"<person> picked up the <object>."`` mixed in among the
moves (distractors for a question about a person), and ``two_hop`` questions ``"Where is the <object>?"``:
the answer is where the person who picked the object up went last (the object goes with them), two
look-ups instead of one.

Two exports of the same story:

    to_record    an LLM-Adapters record {"instruction", "input", "output", "answer"} (story, question and
                 the answer format in the instruction; output "the correct answer is <place>"), for
                 ``segmask train`` and ``segmask eval`` with the paper's Alpaca template; the question
                 after the story (default) or, ``question_first=True``, before it, in the same segment
    to_messages  chat messages: the story and the question as two user turns, then the assistant's answer;
                 under ``mas`` the story and the question are two segments, under ``prefix`` one

:func:`train_test_split` draws a training set and a held-out set with no story in common.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from segmask.files import write_text_atomic
from segmask.tasks.commonsense import ANSWER_PREFIX  # records in the LLM-Adapters format

PEOPLE: tuple[str, ...] = ("Mary", "John", "Sandra", "Daniel", "Emma", "Oliver")
PLACES: tuple[str, ...] = ("kitchen", "garden", "office", "bathroom", "hallway", "bedroom")
VERBS: tuple[str, ...] = ("went to", "moved to", "travelled to", "journeyed to", "went back to")
OBJECTS: tuple[str, ...] = ("apple", "football", "milk", "book", "key", "umbrella")
INSTRUCTION = "Read the story and answer the question."


@dataclass(frozen=True)
class Story:
    """Sentences, one question about them, its answer; ``choices`` is the answer vocabulary (the candidates)."""

    sentences: tuple[str, ...]
    question: str
    answer: str
    choices: tuple[str, ...] = PLACES

    def __post_init__(self) -> None:
        if not self.sentences:
            raise ValueError("a story needs at least one sentence")
        if not self.question.strip():
            raise ValueError("a story needs a question")
        if self.answer not in self.choices:
            raise ValueError(f"answer {self.answer!r} is not one of the choices {list(self.choices)}")

    @property
    def text(self) -> str:
        """The story as one paragraph, a sentence per line."""
        return "\n".join(self.sentences)


@dataclass(frozen=True)
class ReadingTask:
    """How stories are drawn: who moves, where, and how many sentences a story has.

    ``min_sentences`` / ``max_sentences`` count the moves; ``pickups`` adds that many sentences in which
    a person who moves picks up one of ``objects`` (each object at most once, never put down);
    ``two_hop`` is the fraction of stories whose question asks where a picked-up object is instead of where
    a person is (``True`` or 1: all of them; needs ``pickups >= 1``).
    """

    people: tuple[str, ...] = PEOPLE[:4]
    places: tuple[str, ...] = PLACES
    min_sentences: int = 3
    max_sentences: int = 6
    objects: tuple[str, ...] = OBJECTS
    pickups: int = 0
    two_hop: float = 0.0

    def __post_init__(self) -> None:
        if len(self.people) < 1 or len(set(self.people)) != len(self.people):
            raise ValueError(f"people must be distinct names, at least one; got {list(self.people)}")
        if len(self.places) < 2 or len(set(self.places)) != len(self.places):
            raise ValueError(f"places must be at least two distinct names; got {list(self.places)}")
        if not 1 <= self.min_sentences <= self.max_sentences:
            raise ValueError(
                f"need 1 <= min_sentences <= max_sentences, got {self.min_sentences} and {self.max_sentences}"
            )
        if len(set(self.objects)) != len(self.objects):
            raise ValueError(f"objects must be distinct names; got {list(self.objects)}")
        if not 0 <= self.pickups <= len(self.objects):
            raise ValueError(f"need 0 <= pickups <= {len(self.objects)} (the objects), got {self.pickups}")
        if not 0 <= self.two_hop <= 1:
            raise ValueError(f"two_hop is a fraction of the stories, 0 to 1; got {self.two_hop}")
        if self.two_hop and self.pickups < 1:
            raise ValueError("two_hop questions ask where a picked-up object is: they need pickups >= 1")


def generate_story(rng: random.Random, task: ReadingTask = ReadingTask()) -> Story:
    """One story: ``n`` moves of random people to random places, and where one of them is now.

    A person never "moves" to the place they are already in, and the asked person is one who moved.
    With ``task.pickups``, that many pickup sentences by people who move go in at random places among the
    moves; with ``task.two_hop`` (all, or that fraction of the stories: one more draw decides) the question
    asks for one picked-up object, whose place is its holder's
    last move (before or after the pickup: the story ends with the object in their hands).
    """
    where: dict[str, str] = {}
    sentences = []
    for _ in range(rng.randint(task.min_sentences, task.max_sentences)):
        person = rng.choice(task.people)
        place = rng.choice([p for p in task.places if p != where.get(person)])
        where[person] = place
        sentences.append(f"{person} {rng.choice(VERBS)} the {place}.")
    if not task.pickups:  # the original task, draw for draw
        person = rng.choice(sorted(where))
        return Story(tuple(sentences), f"Where is {person}?", where[person], task.places)
    holders = {thing: rng.choice(sorted(where)) for thing in rng.sample(task.objects, task.pickups)}
    for thing, holder in holders.items():
        sentences.insert(rng.randint(0, len(sentences)), f"{holder} picked up the {thing}.")
    if task.two_hop == 1 or (task.two_hop and rng.random() < task.two_hop):
        thing = rng.choice(sorted(holders))
        return Story(tuple(sentences), f"Where is the {thing}?", where[holders[thing]], task.places)
    person = rng.choice(sorted(where))
    return Story(tuple(sentences), f"Where is {person}?", where[person], task.places)


def generate_stories(
    count: int, seed: int, task: ReadingTask = ReadingTask(), exclude: frozenset[str] = frozenset()
) -> list[Story]:
    """``count`` distinct stories drawn with ``seed``; a story whose text and question are in ``exclude``
    (see :func:`story_key`) is never drawn."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(seed)
    stories: list[Story] = []
    seen = set(exclude)
    for _ in range(100 * count + 100):
        if len(stories) == count:
            return stories
        story = generate_story(rng, task)
        if story_key(story) not in seen:
            seen.add(story_key(story))
            stories.append(story)
    raise ValueError(f"could not draw {count} distinct stories from {task}; allow more sentences or people")


def story_key(story: Story) -> str:
    """What makes two stories the same example: the text and the question."""
    return story.text + "\n" + story.question


def train_test_split(
    n_train: int, n_test: int, seed: int, task: ReadingTask = ReadingTask()
) -> tuple[list[Story], list[Story]]:
    """A training set and a held-out set drawn with ``seed``; no held-out story occurs in training."""
    train = generate_stories(n_train, seed, task)
    held_out = generate_stories(n_test, seed + 1_000_003, task, frozenset(map(story_key, train)))
    return train, held_out


# ---- exports --------------------------------------------------------------------------------------


def to_record(story: Story, answer_format: bool = True, question_first: bool = False) -> dict[str, str]:
    """The story as an LLM-Adapters record; ``answer_format`` lists the choices as the commonsense files do.

    The story and the question are both in the instruction (one segment under ``mas``): the question after
    the story (the paper's layout), or before it with ``question_first``; the words are the same.
    """
    question = f"Question: {story.question}"
    body = f"{question}\n\n{story.text}" if question_first else f"{story.text}\n\n{question}"
    instruction = f"{INSTRUCTION}\n\n{body}"
    if answer_format:
        instruction += f"\n\nAnswer format: {'/'.join(story.choices)}"
    return {
        "instruction": instruction,
        "input": "",
        "output": ANSWER_PREFIX + story.answer,
        "answer": story.answer,
    }


def to_messages(story: Story, include_answer: bool = True, answer_prefix: str = "") -> list[dict[str, str]]:
    """The story and the question as two user turns, then (``include_answer``) the answer as the assistant.

    ``answer_prefix`` goes before the answer (``ANSWER_PREFIX`` for the LLM-Adapters target, "" for a bare
    answer word).
    """
    messages = [{"role": "user", "content": story.text}, {"role": "user", "content": story.question}]
    if include_answer:
        messages.append({"role": "assistant", "content": answer_prefix + story.answer})
    return messages


def write_json(records: Sequence[dict], path: str | Path) -> Path:
    """Write records as a JSON list (the LLM-Adapters file format) and return the path."""
    return write_text_atomic(path, json.dumps(list(records), indent=1, ensure_ascii=False) + "\n")


def write_jsonl(conversations: Sequence[list[dict[str, str]]], path: str | Path) -> Path:
    """Write chat conversations as ``{"messages": [...]}`` lines (the chat JSONL training format)."""
    lines = [json.dumps({"messages": messages}, ensure_ascii=False) for messages in conversations]
    return write_text_atomic(path, "\n".join(lines) + "\n")
