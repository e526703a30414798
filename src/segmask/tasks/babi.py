"""Read the bAbI QA tasks (v1.2, ``en`` or ``en-10k``) into stories with one question each.

    >>> from segmask.tasks.babi import read_task
    >>> stories = read_task("../shared/data/babi/en-10k", task=1, split="test")  # doctest: +SKIP
    >>> stories[0].text, stories[0].question, stories[0].answer                  # doctest: +SKIP
    ('Mary moved to the bathroom.\\nJohn went to the hallway.', 'Where is Mary?', 'bathroom')

The files hold numbered lines; numbering restarts at 1 with each new story, and a question line is
``N question<TAB>answer<TAB>supporting line numbers``::

    1 Mary moved to the bathroom.
    2 John went to the hallway.
    3 Where is Mary? \tbathroom\t1

Every question becomes one :class:`segmask.tasks.reading.Story` whose sentences are the story's statements
before it (earlier questions left out), as in the bAbI papers. Its ``choices`` are the task's answer
vocabulary: every answer of the task's train and test files, sorted. Export with
:func:`segmask.tasks.reading.to_record` or :func:`segmask.tasks.reading.to_messages`.

A story can also become one multi-turn chat with all its questions (:func:`read_story_questions`,
:func:`story_messages`): each question is a round of user turns (the statements since the previous
question, then the question) and an assistant turn (the answer), so one sequence trains every answer::

    user: Mary moved to the bathroom. John went to the hallway.    user: Where is Mary?     assistant: bathroom
    user: Daniel went back to the hallway.                         user: Where is Daniel?   assistant: hallway
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from segmask.tasks.reading import Story

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Question:
    """One parsed question: its statements, question, answer and the supporting line numbers."""

    sentences: tuple[str, ...]
    question: str
    answer: str
    supporting: tuple[int, ...]
    story: int = 0  # 0-based index of the question's story in its file (a new story starts at line id 1)


def task_file(babi_dir: str | Path, task: int, split: str) -> Path:
    """``<babi_dir>/qa<task>_<name>_<split>.txt``; a ``FileNotFoundError`` says what is missing."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not isinstance(task, int) or not 1 <= task <= 20:
        raise ValueError(f"bAbI tasks are numbered 1..20, got {task!r}")
    babi_dir = Path(babi_dir)
    found = sorted(babi_dir.glob(f"qa{task}_*_{split}.txt"))
    if not found:
        raise FileNotFoundError(f"no bAbI file qa{task}_*_{split}.txt in {babi_dir}")
    return found[0]


def parse_babi(text: str, source: str = "<text>") -> list[Question]:
    """All questions of a bAbI file's text, in file order; a ``ValueError`` names the bad line."""
    questions: list[Question] = []
    statements: dict[int, str] = {}
    story = -1
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        index, _, rest = line.partition(" ")
        if not index.isdigit() or not rest:
            raise ValueError(f"{source}:{number}: expected '<id> <text>', got {line!r}")
        if int(index) == 1:
            statements, story = {}, story + 1
        if "\t" not in rest:
            statements[int(index)] = rest.strip()
            continue
        fields = rest.split("\t")
        if len(fields) != 3 or not fields[1].strip():
            raise ValueError(
                f"{source}:{number}: expected 'question<TAB>answer<TAB>supporting ids', got {line!r}"
            )
        supporting = tuple(int(i) for i in fields[2].split())
        questions.append(
            Question(tuple(statements.values()), fields[0].strip(), fields[1].strip(), supporting, story)
        )
    if not questions:
        raise ValueError(f"{source}: no questions found")
    return questions


def read_questions(babi_dir: str | Path, task: int, split: str) -> list[Question]:
    """The questions of one task's split."""
    path = task_file(babi_dir, task, split)
    return parse_babi(path.read_text(encoding="utf-8"), str(path))


def answer_choices(babi_dir: str | Path, task: int) -> tuple[str, ...]:
    """The task's answer vocabulary: every answer in its train and test files that exist, sorted."""
    answers: set[str] = set()
    for split in SPLITS:
        try:
            answers.update(q.answer for q in read_questions(babi_dir, task, split))
        except FileNotFoundError:
            continue  # en-10k lacks qa3 train
    if not answers:
        raise FileNotFoundError(f"no bAbI file for task {task} in {babi_dir}")
    return tuple(sorted(answers))


def read_task(babi_dir: str | Path, task: int, split: str, limit: int | None = None) -> list[Story]:
    """The first ``limit`` questions (all when ``None``) of a task's split as stories, with the task's choices."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    choices = answer_choices(babi_dir, task)
    questions = read_questions(babi_dir, task, split)[:limit]
    return [Story(q.sentences, q.question, q.answer, choices) for q in questions]


def with_choices(stories: list[Story], choices: tuple[str, ...]) -> list[Story]:
    """The same stories with another answer vocabulary (e.g. one shared by several tasks)."""
    return [replace(story, choices=choices) for story in stories]


def read_story_questions(
    babi_dir: str | Path, task: int, split: str, limit: int | None = None
) -> list[list[Question]]:
    """The questions of a task's split grouped by story, in file order (the first ``limit`` questions when
    given; a story cut by the limit keeps its first questions)."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    return group_by_story(read_questions(babi_dir, task, split)[:limit])


def group_by_story(questions: list[Question]) -> list[list[Question]]:
    """Consecutive questions of the same story, one list per story."""
    stories: list[list[Question]] = []
    for question in questions:
        if stories and stories[-1][0].story == question.story:
            stories[-1].append(question)
        else:
            stories.append([question])
    return stories


def story_messages(
    questions: list[Question], merge_turns: bool = False, include_last_answer: bool = True
) -> list[dict[str, str]]:
    """One story's questions as one chat: per question, a user turn with the statements added since the
    previous question (left out when there are none), a user turn with the question, and the answer as the
    assistant turn. ``merge_turns`` puts the statements and the question in one user turn;
    ``include_last_answer=False`` ends the chat at the last question (a prompt to answer it)."""
    if not questions:
        raise ValueError("a story needs at least one question")
    if len({q.story for q in questions}) != 1:
        raise ValueError("the questions come from more than one story")
    messages: list[dict[str, str]] = []
    seen = 0
    for number, question in enumerate(questions):
        if number and question.sentences[:seen] != questions[number - 1].sentences:
            raise ValueError(f"question {number}'s statements do not extend the previous question's")
        new = "\n".join(question.sentences[seen:])
        seen = len(question.sentences)
        turns = [new, question.question] if new else [question.question]
        if merge_turns:
            turns = ["\n".join(turns)]
        messages += [{"role": "user", "content": turn} for turn in turns]
        if include_last_answer or number < len(questions) - 1:
            messages.append({"role": "assistant", "content": question.answer})
    return messages
