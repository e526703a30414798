"""Items from a procedural generator nobody here wrote: ``reasoning-gym`` (0.1.25, Apache-2.0), split into a
passage and a question so the question can go after the passage or before it.

    from segmask.tasks.gym import train_test_split, to_record   # needs `pip install reasoning-gym==0.1.25`
    train, held_out = train_test_split("family_relationships", 800, 300, seed=0)
    records = [to_record(item, question_first=True) for item in train]

reasoning-gym draws every item from a seeded generator (no downloads). An item's text is a passage and
a question separated by its last blank line ("Jayden is married to Elizabeth. They have a child called
Edward. ...\\n\\nWhat is Edward to Elizabeth? Answer with a single word."); :func:`split_item` cuts it
there and refuses an item without one. The answer becomes an LLM-Adapters record, "the correct answer is
<answer>", so ``segmask train`` and ``segmask eval`` (``loglik`` over every answer the task's records
name) need nothing new.

A note on ``family_relationships`` as measured in 0.1.25: for in-law pairs the label names what the
*second* person is to the first ("What is Sarah to Elizabeth?" with Sarah married to Elizabeth's son gives
``mother-in-law``), the reverse of every other relation. The rule is consistent, so it is learnable; the
labels are kept as the generator gives them.

reasoning-gym is imported only when items are drawn; it is not a dependency of segmask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from segmask.tasks.commonsense import ANSWER_PREFIX

INSTRUCTION = "Read the text and answer the question."
VERSION = "0.1.25"


@dataclass(frozen=True)
class GymItem:
    """One generated item: the passage, the question about it, the answer (a short string)."""

    passage: str
    question: str
    answer: str

    def __post_init__(self) -> None:
        for name in ("passage", "question", "answer"):
            if not getattr(self, name).strip():
                raise ValueError(f"a gym item needs a non-empty {name}")


def split_item(entry: Mapping[str, Any]) -> GymItem:
    """A reasoning-gym entry (``{"question", "answer", ...}``) as a passage and a question, cut at the last
    blank line of its text."""
    text, answer = str(entry["question"]).strip(), str(entry["answer"]).strip()
    passage, blank, question = text.rpartition("\n\n")
    if not blank or not passage.strip():
        raise ValueError(
            f"cannot split this item into a passage and a question (no blank line): {text[:80]!r}"
        )
    return GymItem(passage.strip(), question.strip(), answer)


def item_key(item: GymItem) -> str:
    """What makes two items the same example: the passage and the question."""
    return item.passage + "\n" + item.question


def generate_items(
    name: str,
    count: int,
    seed: int,
    config: Mapping[str, Any] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> list[GymItem]:
    """``count`` distinct items of the reasoning-gym dataset ``name`` drawn with ``seed`` (``config``: the
    dataset's options, e.g. ``{"min_family_size": 6}``); items whose key is in ``exclude`` are skipped."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    try:
        import reasoning_gym  # noqa: PLC0415  (optional: only the study needs it)
    except ImportError as error:
        raise ValueError(f"reasoning-gym is not installed: pip install reasoning-gym=={VERSION}") from error
    items: list[GymItem] = []
    seen = set(exclude)
    pool = 2 * count + 100
    try:
        dataset = reasoning_gym.create_dataset(name, size=pool, seed=seed, **dict(config or {}))
    except (AssertionError, TypeError, ValueError, KeyError) as error:  # reasoning-gym checks with assert
        raise ValueError(f"reasoning-gym dataset {name!r} with {dict(config or {})}: {error}") from error
    for index in range(pool):
        item = split_item(dataset[index])
        if item_key(item) not in seen:
            seen.add(item_key(item))
            items.append(item)
            if len(items) == count:
                return items
    raise ValueError(f"could not draw {count} distinct {name} items with seed {seed} from {pool} candidates")


def train_test_split(
    name: str, n_train: int, n_test: int, seed: int, config: Mapping[str, Any] | None = None
) -> tuple[list[GymItem], list[GymItem]]:
    """A training set and a held-out set drawn with ``seed``; no held-out item occurs in training."""
    train = generate_items(name, n_train, seed, config)
    held_out = generate_items(name, n_test, seed + 1_000_003, config, frozenset(map(item_key, train)))
    return train, held_out


def to_record(item: GymItem, question_first: bool = False) -> dict[str, str]:
    """The item as an LLM-Adapters record: passage and question in the instruction (one segment under
    ``mas``), the question after the passage or (``question_first``) before it; the words are the same."""
    question = f"Question: {item.question}"
    body = f"{question}\n\n{item.passage}" if question_first else f"{item.passage}\n\n{question}"
    return {
        "instruction": f"{INSTRUCTION}\n\n{body}",
        "input": "",
        "output": ANSWER_PREFIX + item.answer,
        "answer": item.answer,
    }
