"""Where the demo study stands: one line per (condition, seed) unit, and how many are done.

    python experiments/demo_study/status.py [--out results/demo_study] [--seeds 0 1 2] [--steps 400]

Reads only files (``unit.json``, ``curve.jsonl``, ``train/metrics.jsonl``, ``.lock``); runs no model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import CONDITIONS, DEFAULT_OUT, DEFAULT_STEPS, SEEDS, _alive, read_curve, unit_dir  # noqa: E402


def lock_pid(unit: Path) -> int | None:
    """The pid of the live process that holds the unit, else None (no lock, or a stale one)."""
    try:
        pid = int((unit / ".lock").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def unit_line(unit: Path, steps: int) -> tuple[bool, str]:
    """(done, description) of one unit."""
    done = unit / "unit.json"
    if done.exists():
        summary = json.loads(done.read_text())
        own = summary["final"][summary["own_mask"]]
        others = ", ".join(
            f"{name} {100 * score['accuracy']:.1f}"
            for name, score in summary["final"].items()
            if name != summary["own_mask"]
        )
        hours = summary["cpu_time_s"]["total"] / 3600
        return True, (
            f"done: own-mask accuracy {100 * own['accuracy']:.1f} % (n={own['n']}); cross: {others}; "
            f"{hours:.2f} CPU-h"
        )
    settings = unit / "config.json"
    if not settings.exists():
        return False, "not started"
    steps = json.loads(settings.read_text()).get("steps", steps)
    curve = read_curve(unit / "curve.jsonl")
    losses = [r for r in curve if r["kind"] == "loss"]
    metrics = unit / "train" / "metrics.jsonl"
    trained = 0
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                trained = max(trained, json.loads(line).get("step", 0))
            except json.JSONDecodeError:
                continue
    trained = max([trained] + [r["step"] for r in losses])
    last = f", held-out loss {losses[-1]['loss']:.4f} at step {losses[-1]['step']}" if losses else ""
    running = " (running)" if lock_pid(unit) else " (stopped: rerun run.py to resume)"
    if (unit / "train" / "segmask.json").exists():
        return False, f"trained ({steps} steps), final evaluations left{last}{running}"
    return False, f"training: step {trained} of {steps}{last}{running}"


def status(out: Path, seeds: list[int], steps: int) -> str:
    lines, done = [], 0
    for condition in CONDITIONS:
        for seed in seeds:
            finished, text = unit_line(unit_dir(out, condition, seed), steps)
            done += finished
            lines.append(f"{condition:9} seed {seed}: {text}")
    total = len(CONDITIONS) * len(seeds)
    left = total - done
    lines.append(f"{done} of {total} units done, {left} left")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="for units not yet configured")
    args = parser.parse_args(argv)
    print(status(Path(args.out), args.seeds, args.steps), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
