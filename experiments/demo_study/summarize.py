"""Tables and plot of the demo study, from whatever units are finished (partial results are fine).

    python experiments/demo_study/summarize.py [--out results/demo_study]

Writes ``summary.md``, ``summary.json`` and ``curves.png`` into ``--out``. Every number says how many seeds
it rests on. The statistics:

- per seed: accuracy with its 95 % Wilson interval, and McNemar's exact test of the condition against causal
  on the same held-out stories (same seed): the per-seed detail, which treats that seed's trained models
  as fixed (it measures test-set noise, not the variation between training runs);
- over seeds: the mean with a 95 % t interval (n - 1 degrees of freedom, none below 2 seeds), and for each
  condition minus causal the **paired t-test on the seed-level differences** (one-sample t on
  ``acc(condition, seed) - acc(causal, seed)``, two-sided; the seed is the unit of replication). With 3 seeds
  the test has 2 degrees of freedom.

The pre-registered endpoint is in ``results/demo_study/README.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import CONDITIONS, DEFAULT_OUT, read_curve  # noqa: E402

from segmask.compare import (  # noqa: E402
    interval_text,
    mcnemar,
    over_seeds,
    p_text,
    paired_t,
    percent_text,
)


def load_units(out: Path) -> tuple[dict, dict]:
    """(finished units {(condition, seed): unit.json}, curves {(condition, seed): rows}) under ``out/runs``."""
    finished, curves = {}, {}
    for condition in CONDITIONS:
        for folder in sorted((out / "runs" / condition).glob("seed*")):
            seed = int(folder.name[4:])
            curves[condition, seed] = read_curve(folder / "curve.jsonl")
            if (folder / "unit.json").exists():
                finished[condition, seed] = json.loads((folder / "unit.json").read_text())
    return finished, curves


def interval(summary: dict, signed: bool = False) -> str:
    if summary["mean"] is None:
        return "– (0 seeds)"
    n = summary["n_seeds"]
    return interval_text(summary, signed) + f" (n={n} seed{'s' if n != 1 else ''})"


def bits(unit: dict, mask: str) -> list[bool]:
    return [c == "1" for c in unit["final"][mask]["correct_bits"]]


def summarize(out: Path) -> dict:
    finished, curves = load_units(out)
    seeds = sorted({seed for _, seed in curves})
    lines = ["# Demo study: summary", ""]
    total = len(CONDITIONS) * max(len(seeds), 3)
    lines.append(f"{len(finished)} units finished (of {total} planned with {max(len(seeds), 3)} seeds).")
    lines.append("")

    # per seed
    lines += ["## Final held-out accuracy per seed (own mask)", ""]
    lines += [
        "| condition | seed | accuracy [95 % Wilson] | vs causal: right only in it / only in causal | McNemar p |"
    ]
    lines += ["|---|---|---|---|---|"]
    per_seed = []
    for condition in CONDITIONS:
        for seed in seeds:
            unit = finished.get((condition, seed))
            if unit is None:
                continue
            score = unit["final"][condition]
            row = {
                "condition": condition,
                "seed": seed,
                **{k: score[k] for k in ("n", "accuracy", "ci_low", "ci_high")},
            }
            test_cells = "– | –"
            base = finished.get(("causal", seed))
            if condition != "causal" and base is not None:
                test = mcnemar(bits(base, "causal"), bits(unit, condition))
                row["mcnemar"] = {
                    "only_causal": test.only_a,
                    "only_condition": test.only_b,
                    "p_value": test.p_value,
                }
                test_cells = f"{test.only_b} / {test.only_a} | {test.p_value:.3g}"
            per_seed.append(row)
            wilson = f"{percent_text(score['accuracy'])} [{percent_text(score['ci_low'])}, {percent_text(score['ci_high'])}] (n={score['n']})"
            lines.append(f"| {condition} | {seed} | {wilson} | {test_cells} |")
    lines.append("")

    # over seeds
    lines += ["## Over seeds (final step, own mask)", ""]
    lines += [
        "Intervals are the t intervals over seeds as computed (mean +- t x SE), not clipped to [0, 100]: "
        "with 2-3 seeds near 100 % they reach past it.",
        "",
    ]
    lines += ["| condition | mean accuracy [95 % t] | minus causal, paired by seed [95 % t] | paired t p |"]
    lines += ["|---|---|---|---|"]
    aggregate = {}
    for condition in CONDITIONS:
        values = [
            finished[condition, s]["final"][condition]["accuracy"]
            for s in seeds
            if (condition, s) in finished
        ]
        entry = {"accuracy": over_seeds(values)}
        diff_cell = p_cell = "–"
        if condition != "causal":
            diffs = [
                finished[condition, s]["final"][condition]["accuracy"]
                - finished["causal", s]["final"]["causal"]["accuracy"]
                for s in seeds
                if (condition, s) in finished and ("causal", s) in finished
            ]
            entry["minus_causal"] = paired_t(diffs) | {"per_seed": diffs}
            diff_cell = interval(entry["minus_causal"], signed=True)
            p_cell = p_text(entry["minus_causal"], len(diffs))
        aggregate[condition] = entry
        lines.append(f"| {condition} | {interval(entry['accuracy'])} | {diff_cell} | {p_cell} |")
    lines.append("")

    # issue 20 part 4: the sink against the paper's mask, paired by seed
    lines += ["## The sink against the paper's mask (mas_sink minus mas, own masks, paired by seed)", ""]
    lines += ["| step | per seed | mean [95 % t] | paired t p |", "|---|---|---|---|"]
    sink_vs_mas = {}
    sink_curves = {c: {} for c in ("mas", "mas_sink")}
    for condition in sink_curves:
        for (name, seed), rows in curves.items():
            if name == condition:
                for row in rows:
                    if row["kind"] == "accuracy":
                        sink_curves[condition].setdefault(row["step"], {})[seed] = row["accuracy"]
        for (name, seed), unit in finished.items():
            if name == condition:
                step = unit["settings"]["steps"]
                sink_curves[condition].setdefault(step, {})[seed] = unit["final"][condition]["accuracy"]
    for step in sorted(set(sink_curves["mas"]) & set(sink_curves["mas_sink"])):
        both = sorted(set(sink_curves["mas"][step]) & set(sink_curves["mas_sink"][step]))
        diffs = [sink_curves["mas_sink"][step][s] - sink_curves["mas"][step][s] for s in both]
        if not diffs:
            continue
        test = paired_t(diffs) | {"per_seed": dict(zip(both, diffs))}
        sink_vs_mas[str(step)] = test
        seeds_text = ", ".join(f"seed {s}: {100 * d:+.1f}" for s, d in zip(both, diffs))
        lines.append(
            f"| {step} | {seeds_text} | {interval(test, signed=True)} | {p_text(test, len(diffs))} |"
        )
    for seed in seeds:
        if ("mas", seed) in finished and ("mas_sink", seed) in finished:
            test = mcnemar(bits(finished["mas", seed], "mas"), bits(finished["mas_sink", seed], "mas_sink"))
            sink_vs_mas.setdefault("final_mcnemar", {})[seed] = {
                "only_mas": test.only_a,
                "only_mas_sink": test.only_b,
                "p_value": test.p_value,
            }
            lines.append(
                f"\nSeed {seed}, final: {test.only_b} stories right only with the sink, {test.only_a} only "
                f"without (McNemar p = {test.p_value:.3g})."
            )
    lines.append("")

    # cross-mask
    lines += ["## Cross-mask evaluation of the final adapters (mean over seeds)", ""]
    lines += [
        "| trained \\ evaluated | " + " | ".join(CONDITIONS) + " |",
        "|---" * (len(CONDITIONS) + 1) + "|",
    ]
    cross = {}
    for condition in CONDITIONS:
        cells = []
        for mask in CONDITIONS:
            values = [
                finished[condition, s]["final"][mask]["accuracy"]
                for s in seeds
                if (condition, s) in finished and mask in finished[condition, s]["final"]
            ]
            cross.setdefault(condition, {})[mask] = over_seeds(values)
            cells.append(interval(cross[condition][mask]))
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    lines.append("")

    # checkpoints
    lines += ["## Held-out accuracy at the checkpoints (own mask, mean over seeds)", ""]
    checkpoint = {}
    for (condition, seed), rows in curves.items():
        for row in rows:
            if row["kind"] == "accuracy":
                checkpoint.setdefault(condition, {}).setdefault(row["step"], {})[seed] = row["accuracy"]
        if (condition, seed) in finished:
            unit = finished[condition, seed]
            step = unit["settings"]["steps"]
            checkpoint.setdefault(condition, {}).setdefault(step, {})[seed] = unit["final"][condition][
                "accuracy"
            ]
    steps = sorted({step for by_step in checkpoint.values() for step in by_step})
    lines += [
        "| condition | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---" * (len(steps) + 1) + "|",
    ]
    for condition in CONDITIONS:
        by_step = checkpoint.get(condition, {})
        lines.append(
            f"| {condition} | "
            + " | ".join(interval(over_seeds(list(by_step.get(s, {}).values()))) for s in steps)
            + " |"
        )
    lines.append("")
    leaks = {f"{c} seed {s}": u["leak_check_final"] for (c, s), u in finished.items()}
    lines.append(
        f"Leak checks passed on every finished unit before its numbers were written ({len(leaks)} units)."
    )
    lines.append("")

    plot = plot_curves(curves, finished, out / "curves.png")
    lines.append(
        f"Curves: `{plot.name}` (thin lines: seeds; thick: mean over the seeds that reached the step)."
    )
    summary = {
        "units_finished": len(finished),
        "per_seed": per_seed,
        "over_seeds": aggregate,
        "cross_mask": cross,
        "mas_sink_minus_mas": sink_vs_mas,
        "checkpoint_accuracy": {c: {str(k): v for k, v in d.items()} for c, d in checkpoint.items()},
        "leak_check_final": leaks,
        "test": "paired t on seed-level differences (two-sided); McNemar exact per seed",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary


def plot_curves(curves: dict, finished: dict, path: Path) -> Path:
    colours = dict(zip(CONDITIONS, ("tab:blue", "tab:red", "tab:green")))
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for condition in CONDITIONS:
        series = {"loss": {}, "accuracy": {}}
        for (cond, seed), rows in curves.items():
            if cond != condition:
                continue
            for kind, key in (("loss", "loss"), ("accuracy", "accuracy")):
                points = sorted((r["step"], r[key]) for r in rows if r["kind"] == kind)
                if kind == "accuracy" and (cond, seed) in finished:
                    unit = finished[cond, seed]
                    points.append((unit["settings"]["steps"], unit["final"][cond]["accuracy"]))
                if points:
                    series[kind][seed] = dict(points)
                    axis = loss_ax if kind == "loss" else acc_ax
                    xs, ys = zip(*sorted(points))
                    axis.plot(xs, ys, color=colours[condition], alpha=0.3, linewidth=0.8)
        for kind, axis in (("loss", loss_ax), ("accuracy", acc_ax)):
            steps = sorted({s for points in series[kind].values() for s in points})
            if steps:
                means = [statistics.fmean(p[s] for p in series[kind].values() if s in p) for s in steps]
                n = len(series[kind])
                axis.plot(
                    steps, means, color=colours[condition], linewidth=2, label=f"{condition} ({n} seeds)"
                )
    loss_ax.set(
        xlabel="step", ylabel="held-out answer loss (per token, log scale)", title="held-out loss (own mask)"
    )
    loss_ax.set_yscale("log")  # the tail (1e-4..1e-2) is where conditions differ once trained
    acc_ax.set(xlabel="step", ylabel="held-out accuracy", title="held-out accuracy (own mask)")
    for axis in (loss_ax, acc_ax):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    out = Path(args.out)
    summarize(out)
    print((out / "summary.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
