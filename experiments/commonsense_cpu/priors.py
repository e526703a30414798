"""How much of each score is a label prior: predicted-label shares, majority-class rate, balanced accuracy.

    python experiments/commonsense_cpu/priors.py [--results results/commonsense_cpu]

A small model that learned the answer format but not the task scores by its favourite label: accuracy then
tracks how often that label is gold, and a model that always says the majority class beats one that reads
a little. Balanced accuracy (the mean over gold labels of the share of that label's records answered
right) is 1 / (number of labels) for any constant answer, whatever the label frequencies, so a difference
in it is not a difference in priors. Reads the merged ``<model>.predictions.jsonl`` files that run.py
writes; writes ``label_priors.md`` beside them. Nothing here runs a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import MODELS, TASKS  # noqa: E402


def read_predictions(path: Path) -> dict[str, list[tuple[str | None, str]]]:
    """``task -> [(prediction, gold), ...]`` from a predictions JSONL."""
    by_task: dict[str, list[tuple[str | None, str]]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            by_task[row["task"]].append((row["prediction"], row["gold"]))
    return by_task


def balanced_accuracy(pairs: list[tuple[str | None, str]]) -> float:
    """Mean over gold labels of the share of that label's records predicted right."""
    right: Counter = Counter()
    total: Counter = Counter()
    for prediction, gold in pairs:
        total[gold] += 1
        right[gold] += prediction == gold
    return sum(right[label] / total[label] for label in total) / len(total)


def favourite(pairs: list[tuple[str | None, str]]) -> tuple[str | None, float]:
    """The most often predicted label and its share of the records."""
    label, count = Counter(p for p, _ in pairs).most_common(1)[0]
    return label, count / len(pairs)


def table(results: Path, models: list[str], tasks: list[str]) -> str:
    predictions = {m: read_predictions(results / f"{m}.predictions.jsonl") for m in models}
    header = " | ".join(f"{m}: acc / balanced / favourite label" for m in models)
    lines = [f"| task | majority class (rate) | {header} |", "|---|---|" + "---|" * len(models)]
    for task in tasks:
        golds = Counter(g for _, g in predictions[models[0]][task])
        label, count = golds.most_common(1)[0]
        cells = []
        for model in models:
            pairs = predictions[model][task]
            accuracy = sum(p == g for p, g in pairs) / len(pairs)
            fav, share = favourite(pairs)
            cells.append(
                f"{100 * accuracy:.1f} / {100 * balanced_accuracy(pairs):.1f} / {fav} {100 * share:.0f} %"
            )
        chance = 100 / len(golds)
        lines.append(
            f"| {task} (n={sum(golds.values())}, {len(golds)} labels, chance {chance:.1f}) | "
            f"{label} ({100 * count / sum(golds.values()):.1f}) | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "Accuracy and balanced accuracy (mean recall over gold labels; a constant answer scores exactly "
        "chance) in %, and the label each model predicts most with its share of the records.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results/commonsense_cpu")
    args = parser.parse_args(argv)
    results = Path(args.results)
    text = table(results, list(MODELS), list(TASKS))
    (results / "label_priors.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
