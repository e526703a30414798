"""What did the task-1 models learn? Agreement of each run's test predictions with simple shortcuts.

    python experiments/babi_scratch/diagnose.py --results results/babi_scratch

A model that reads the story answers with the asked person's last location (the gold answer). A model on
the shortcut plateau answers with the location of the story's last sentence, whoever moved there; that
shortcut alone is right whenever the asked person moved last.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from segmask.tasks.babi import read_task
from segmask.tasks.reading import Story

MOVE = re.compile(r"^(\w+) .* the (\w+)\.$")


def shortcuts(story: Story) -> dict[str, str]:
    """Candidate answers a model might give: the gold one and two shortcuts."""
    person = story.question.removeprefix("Where is ").rstrip("?")
    moves = [MOVE.match(sentence).groups() for sentence in story.sentences]
    own = [place for who, place in moves if who == person]
    return {
        "last place of the asked person (gold)": own[-1],
        "last place in the story": moves[-1][1],
        "first place of the asked person": own[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results/babi_scratch")
    parser.add_argument("--babi-dir", default="../shared/data/babi/en-10k")
    args = parser.parse_args()
    results = Path(args.results)
    stories = read_task(args.babi_dir, 1, "test")
    rules = list(shortcuts(stories[0]))
    lines = [
        "| run | " + " | ".join(f"agrees with: {rule}" for rule in rules) + " |",
        "|---|" + "---|" * len(rules),
    ]
    right = {rule: sum(shortcuts(s)[rule] == s.answer for s in stories) / len(stories) for rule in rules}
    lines.append(
        "| (the rule itself, accuracy) | " + " | ".join(f"{100 * right[r]:.1f}" for r in rules) + " |"
    )
    for path in sorted((results / "runs").glob("*.predictions.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        # the qa1 questions in test order (a run on mixed tasks also holds other tasks' predictions)
        by_index = {row["index"]: row["prediction"] for row in rows if row["task"] == "qa1"}
        predictions = [by_index[index] for index in range(len(stories))]
        agree = {
            r: sum(shortcuts(s)[r] == p for s, p in zip(stories, predictions)) / len(stories) for r in rules
        }
        lines.append(
            f"| {path.name.split('.')[0]} | " + " | ".join(f"{100 * agree[r]:.1f}" for r in rules) + " |"
        )
    lines += [
        "",
        "Share (%) of the 1,000 qa1 test questions where a run's prediction equals each rule's answer.",
    ]
    (results / "shortcut.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
