"""The MAS study's pilot (issue 33): causal only, one seed, to fix each task's difficulty and the step budget.

    OMP_NUM_THREADS=1 python experiments/mas_study/pilot.py --threads 1 --steps 150 --acc-steps 50 100 \\
        --test-size 100 --loss-size 50 --layouts after [--try NAME]   # train the causal units
    python experiments/mas_study/pilot.py --table                    # write results/mas_study/pilot.md

Runs ``run.py``'s units with ``--conditions causal --eval-masks causal --seeds 0`` into
``results/mas_study/pilot`` (``--try NAME``: ``results/mas_study/pilot/NAME``, for another difficulty; no MAS run, no MAS evaluation: nothing is tuned on MAS). The target: causal's
held-out accuracy at the end of the budget between 45 % and 80 %, with its held-out loss flattened.
``--table`` reads the finished units and writes the table (accuracy at each checkpoint, held-out loss,
CPU time per unit).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402

PILOT_OUT = Path(run.DEFAULT_OUT) / "pilot"
FORCED = ["--conditions", "causal", "--eval-masks", "causal", "--seeds", "0", "--out", str(PILOT_OUT)]


def table(out: Path = PILOT_OUT) -> str:
    """The pilot's finished (and running) units as a Markdown table."""
    lines = [
        "| try | task | question | difficulty | steps | accuracy at checkpoints (n) | final accuracy [95 % Wilson] | held-out loss "
        "(step: loss) | CPU-min (train / total) |",
        "|---|---|---|---|---:|---|---|---|---:|",
    ]
    for folder in sorted(out.glob("runs/*/*/causal/seed0")) + sorted(out.glob("*/runs/*/*/causal/seed0")):
        task, layout = folder.parts[-4], folder.parts[-3]
        attempt = folder.parts[-6] if folder.parts[-6] != out.name else "first"
        settings = json.loads((folder / "config.json").read_text())
        curve = run.demo_study.read_curve(folder / "curve.jsonl")
        accs = ", ".join(
            f"{r['step']}: {100 * r['accuracy']:.1f} %" for r in curve if r["kind"] == "accuracy"
        )
        losses = [r for r in curve if r["kind"] == "loss"]
        loss_text = ", ".join(f"{r['step']}: {r['loss']:.3f}" for r in losses[:: max(1, len(losses) // 6)])
        if losses and losses[-1] is not losses[:: max(1, len(losses) // 6)][-1]:
            loss_text += f", {losses[-1]['step']}: {losses[-1]['loss']:.3f}"
        done = folder / "unit.json"
        if done.exists():
            unit = json.loads(done.read_text())
            final = unit["final"]["causal"]
            final_text = (
                f"{100 * final['accuracy']:.1f} % [{100 * final['ci_low']:.1f}, {100 * final['ci_high']:.1f}]"
            )
            cpu = f"{unit['cpu_time_s']['train'] / 60:.1f} / {unit['cpu_time_s']['total'] / 60:.1f}"
        else:
            final_text, cpu = "(not finished)", "–"
        lines.append(
            f"| {attempt} | {task} | {layout} | `{json.dumps(settings['task_spec']['params'])}` | {settings['steps']} | {accs} (n={settings['test_size']}) | {final_text} | "
            f"{loss_text} | {cpu} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--table"]:
        parser = argparse.ArgumentParser(prog="pilot.py --table")
        parser.add_argument("--table", action="store_true")
        parser.add_argument("--out", default=str(PILOT_OUT))
        args = parser.parse_args(argv)
        print(table(Path(args.out)), end="")
        return 0
    for flag in ("--conditions", "--eval-masks", "--seeds", "--out"):
        if flag in argv:
            print(f"pilot: {flag} is fixed in the pilot (causal only, seed 0, {PILOT_OUT})", file=sys.stderr)
            return 2
    forced = list(FORCED)
    if "--try" in argv:  # another try at a difficulty: its own folder, the earlier tries stay as they were
        at = argv.index("--try")
        name = argv[at + 1] if at + 1 < len(argv) else ""
        if not name.isidentifier():
            print("pilot: --try needs a name (letters, digits, _)", file=sys.stderr)
            return 2
        del argv[at : at + 2]
        forced[-1] = str(PILOT_OUT / name)
    return run.main(argv + forced)


if __name__ == "__main__":
    sys.exit(main())
