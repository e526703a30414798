"""Where the commonsense run stands: trainings, leak checks and evaluations, as a markdown table.

    python experiments/commonsense_cpu/status.py [--results results/commonsense_cpu] [--out runs/commonsense_cpu]

A finished task shows its accuracy with the 95% Wilson interval; an unfinished one only how many records
its journal (``<task>.partial.jsonl``) holds, since the accuracy of a prefix of a test file is not a
result. Nothing here runs a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import MODELS, TASKS  # noqa: E402

from segmask.tasks.commonsense import load_task  # noqa: E402


def training_line(folder: Path, steps: int) -> str:
    """``done (300 steps, eval loss 0.16)``, ``step 120 of 300`` or ``not started``."""
    metrics = folder / "metrics.jsonl"
    if not metrics.exists():
        return "not started"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    last = max((row["step"] for row in rows), default=0)
    loss = f", eval loss {evals[-1]:.4f}" if evals else ""
    if (folder / "segmask.json").exists():
        return f"done ({last} steps{loss})"
    return f"step {last} of {steps}{loss}"


def task_cell(evals: Path, model: str, task: str, total: int) -> str:
    done = evals / model / f"{task}.json"
    if done.exists():
        score = json.loads(done.read_text())["tasks"][task]
        low, high = 100 * score["ci_low"], 100 * score["ci_high"]
        return f"{100 * score['accuracy']:.1f} [{low:.1f}, {high:.1f}] (n={score['n']})"
    partial = evals / model / f"{task}.partial.jsonl"
    if partial.exists():
        count = max(0, len(partial.read_text().splitlines()) - 1)  # minus the header line
        return f"running: {count} of {total}"
    return f"to do ({total})"


def status(results: Path, out: Path, data_dir: str, steps: int) -> str:
    totals = {task: len(load_task(data_dir, task).records) for task in TASKS}
    state = json.loads((results / "state.json").read_text()) if (results / "state.json").exists() else {}
    lines = ["| | " + " | ".join(MODELS) + " |", "|---" * (len(MODELS) + 1) + "|"]
    train = ["base model" if m == "base" else training_line(out / m, steps) for m in MODELS]
    lines.append("| training | " + " | ".join(train) + " |")
    leaks = ["–" if m == "base" else str(state.get("leak_check", {}).get(m, "not yet")) for m in MODELS]
    lines.append("| leak check (largest change) | " + " | ".join(leaks) + " |")
    for task in TASKS:
        cells = [task_cell(results / "evals", m, task, totals[task]) for m in MODELS]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results/commonsense_cpu")
    parser.add_argument("--out", default="runs/commonsense_cpu")
    parser.add_argument("--data-dir", default="../shared/data/commonsense")
    parser.add_argument("--steps", type=int, default=300, help="the recipe's steps")
    args = parser.parse_args(argv)
    print(status(Path(args.results), Path(args.out), args.data_dir, args.steps), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
