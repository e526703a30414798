"""Where the MAS study stands: one line per (task, layout, condition, seed) unit, what is left, and the
command that resumes it.

    python experiments/mas_study/status.py [--out results/mas_study] [--seeds 0 1 2]

Reads only files (``unit.json``, ``curve.jsonl``, ``train/metrics.jsonl``, ``.lock``); runs no model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402
from run import CONDITIONS, DEFAULT_OUT, DEFAULT_STEPS, LAYOUTS, SEEDS, TASKS, unit_dir  # noqa: E402


def _demo_status():
    """experiments/demo_study/status.py, whose ``from run import`` must find the demo study's run.py."""
    mine, path = sys.modules.get("run"), list(sys.path)
    sys.modules["run"] = run.demo_study
    try:
        return run.load_module("demo_study_status", run.HERE.parent / "demo_study" / "status.py")
    finally:
        sys.modules["run"] = mine
        sys.path[:] = path  # it puts experiments/demo_study first, where summarize.py is the demo study's


# the demo study's reader of one unit: done (accuracy, cross-mask, CPU-h) / training step, loss, running
unit_line = _demo_status().unit_line

RESUME = "OMP_NUM_THREADS=1 nohup .venv/bin/python experiments/mas_study/run.py --threads 1 --commit{extra} >> {log} 2>&1 &"


def status(out: Path, seeds: list[int], steps: int) -> str:
    lines, done = [], 0
    for seed in seeds:
        for task in TASKS:
            for layout in LAYOUTS:
                for condition in CONDITIONS:
                    finished, text = unit_line(unit_dir(out, task, layout, condition, seed), steps)
                    done += finished
                    lines.append(f"{task:8} question-{layout:5} {condition:9} seed {seed}: {text}")
    total = len(TASKS) * len(LAYOUTS) * len(CONDITIONS) * len(seeds)
    lines.append(f"{done} of {total} units done, {total - done} left")
    if done < total:
        extra = "" if out == Path(DEFAULT_OUT) else f" --out {out}"
        extra += "" if seeds == list(SEEDS) else " --seeds " + " ".join(map(str, seeds))
        lines.append("resume (finished units are skipped, a stopped one continues from its last checkpoint):")
        lines.append("  " + RESUME.format(extra=extra, log=out / "study.log"))
        lines.append("or, on 2 cores, one runner per task (each keeps the seed-major order):")
        for task in TASKS:
            log = out / ("study.log" if task == next(iter(TASKS)) else f"study-{task}.log")
            lines.append("  " + RESUME.format(extra=f" --tasks {task}{extra}", log=log))
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
