"""Moved to :mod:`segmask.tasks.babi`; this path works, with a ``DeprecationWarning``, for one release."""

import warnings

from segmask.tasks.babi import (
    SPLITS,
    Question,
    answer_choices,
    group_by_story,
    parse_babi,
    read_questions,
    read_story_questions,
    read_task,
    story_messages,
    task_file,
    with_choices,
)

warnings.warn("segmask.babi moved to segmask.tasks.babi", DeprecationWarning, stacklevel=2)

__all__ = [
    "SPLITS",
    "Question",
    "answer_choices",
    "group_by_story",
    "parse_babi",
    "read_questions",
    "read_story_questions",
    "read_task",
    "story_messages",
    "task_file",
    "with_choices",
]
