"""Moved to :mod:`segmask.tasks.reading`; this path works, with a ``DeprecationWarning``, for one release."""

import warnings

from segmask.tasks.reading import (
    ANSWER_PREFIX,
    INSTRUCTION,
    PEOPLE,
    PLACES,
    VERBS,
    ReadingTask,
    Story,
    generate_stories,
    generate_story,
    story_key,
    to_messages,
    to_record,
    train_test_split,
    write_json,
    write_jsonl,
)

warnings.warn("segmask.reading_task moved to segmask.tasks.reading", DeprecationWarning, stacklevel=2)

__all__ = [
    "ANSWER_PREFIX",
    "INSTRUCTION",
    "PEOPLE",
    "PLACES",
    "VERBS",
    "ReadingTask",
    "Story",
    "generate_stories",
    "generate_story",
    "story_key",
    "to_messages",
    "to_record",
    "train_test_split",
    "write_json",
    "write_jsonl",
]
