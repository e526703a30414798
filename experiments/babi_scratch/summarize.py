"""Tables and a plot from the per-run results of run.py: mean and spread across seeds, the difference against
causal per seed and over seeds (mean, 95 % t interval, paired t-test with the seed as the unit), per-seed
McNemar tests.

python experiments/babi_scratch/summarize.py --results results/babi_scratch --tasks 1 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from segmask.compare import compare_runs, interval_text, load_run, p_text, paired_t, paired_test, percent_text

BASELINE = "causal"


def summarize(results: Path, tasks: list[int], seeds: list[int], policies: list[str]) -> dict:
    """Write ``table.md``, ``accuracy.png`` and per-seed comparison tables; return the numbers."""
    runs = {(p, s): load_run(results / "runs" / f"{p}-seed{s}.json") for p in policies for s in seeds}
    names = [f"qa{t}" for t in tasks]
    summary: dict = {"tasks": {}, "differences": {}, "paired": {}}
    for task in names:
        summary["tasks"][task] = {}
        for policy in policies:
            accuracies = [runs[policy, s].results["tasks"][task]["accuracy"] for s in seeds]
            summary["tasks"][task][policy] = {
                "per_seed": dict(zip(map(str, seeds), accuracies)),
                "mean": statistics.mean(accuracies),
                "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "min": min(accuracies),
                "max": max(accuracies),
            }
        for policy in policies:
            if policy == BASELINE or BASELINE not in policies:
                continue
            for seed in seeds:
                test = paired_test(runs[BASELINE, seed], runs[policy, seed], [task])
                summary["paired"].setdefault(task, {}).setdefault(f"{policy} vs {BASELINE}", {})[
                    str(seed)
                ] = {
                    "n": test.n,
                    "right_only_in_policy": test.only_b,
                    "right_only_in_causal": test.only_a,
                    "p_value": test.p_value,
                }
    summary["differences"] = differences(summary["tasks"], policies, seeds)
    for seed in seeds:
        compare_runs(
            [results / "runs" / f"{p}-seed{seed}.json" for p in policies],
            results / f"compare-seed{seed}.md",
            results / f"compare-seed{seed}.png",
        )
    (results / "table.md").write_text(table(summary, policies, seeds), encoding="utf-8")
    plot(summary, policies, seeds, results / "accuracy.png")
    return summary


def differences(tasks: dict, policies: list[str], seeds: list[int]) -> dict:
    """``acc(policy) - acc(causal)`` per task and over the tasks' mean: per seed, then over seeds (mean,
    95 % t interval, two-sided paired t-test on the seed-level differences)."""
    result: dict = {}
    if BASELINE not in policies:
        return result
    for policy in policies:
        if policy == BASELINE:
            continue
        by_task = {}
        for task, by_policy in tasks.items():
            per_seed = [
                by_policy[policy]["per_seed"][str(s)] - by_policy[BASELINE]["per_seed"][str(s)] for s in seeds
            ]
            by_task[task] = paired_t(per_seed) | {"per_seed": dict(zip(map(str, seeds), per_seed))}
        if len(tasks) > 1:
            mean_over_tasks = [
                sum(by_task[task]["per_seed"][str(s)] for task in tasks) / len(tasks) for s in seeds
            ]
            by_task["mean of tasks"] = paired_t(mean_over_tasks) | {
                "per_seed": dict(zip(map(str, seeds), mean_over_tasks))
            }
        result[f"{policy} - {BASELINE}"] = by_task
    return result


def difference_table(summary: dict, seeds: list[int]) -> list[str]:
    """The pre-registered endpoint: per task, the difference against causal per seed and over seeds."""
    lines = [
        "| comparison | task | per seed " + str(seeds) + " | mean [95 % t interval] | paired t p |",
        "|---|---|---|---|---|",
    ]
    for comparison, by_task in summary["differences"].items():
        for task, test in by_task.items():
            per_seed = ", ".join(percent_text(v, signed=True) for v in test["per_seed"].values())
            lines.append(
                f"| {comparison} | {task} | {per_seed} | {interval_text(test, signed=True)} | "
                f"{p_text(test, len(test['per_seed']))} |"
            )
    lines += [
        "",
        "Accuracy difference in points; the seed is the unit (same initialisation and data order within a "
        "seed), two-sided paired t-test on the seed-level differences.",
        "",
    ]
    return lines


def table(summary: dict, policies: list[str], seeds: list[int]) -> str:
    """Mean ± standard deviation across seeds (per-seed values in brackets), then the paired tests."""
    lines = ["| task | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    for task, by_policy in summary["tasks"].items():
        cells = []
        for policy in policies:
            entry = by_policy[policy]
            seeds_text = ", ".join(f"{100 * a:.1f}" for a in entry["per_seed"].values())
            cells.append(f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f} ({seeds_text})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Accuracy in %, mean ± standard deviation over seeds {seeds} (per-seed values in brackets).",
        "",
    ]
    lines += difference_table(summary, seeds)
    lines += [
        "| task | comparison | seed | right only in it / only in causal | McNemar p |",
        "|---|---|---|---|---|",
    ]
    for task, comparisons in summary["paired"].items():
        for comparison, by_seed in comparisons.items():
            for seed, test in by_seed.items():
                star = "*" if test["p_value"] < 0.05 else ""
                lines.append(
                    f"| {task} | {comparison} | {seed} | {test['right_only_in_policy']} / "
                    f"{test['right_only_in_causal']} of {test['n']} | {test['p_value']:.3g}{star} |"
                )
    lines += ["", "Paired per seed (same initialisation and data order): McNemar exact test, * p < 0.05."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, policies: list[str], seeds: list[int], out: Path) -> None:
    """Bars: mean accuracy per task and condition; dots: the individual seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(tasks) + 2), 3.8), layout="constrained")
    for k, policy in enumerate(policies):
        for i, task in enumerate(tasks):
            entry = summary["tasks"][task][policy]
            x = i - 0.4 + width * (k + 0.5)
            ax.bar(x, 100 * entry["mean"], width, color=f"C{k}", label=policy if i == 0 else None)
            ax.scatter(
                [x] * len(seeds), [100 * a for a in entry["per_seed"].values()], color="black", s=10, zorder=3
            )
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title(f"bAbI from scratch: mean over seeds {seeds} (dots: seeds)")
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_losses(curves: dict[str, Path], out: Path) -> None:
    """Training loss (answer tokens only) against the step, one line per run (colour: condition, line style:
    seed), from each run's ``metrics.jsonl`` (``{name: path}``; names ``<condition>-seed<N>``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(dict.fromkeys(name.rsplit("-seed", 1)[0] for name in curves))
    seeds = sorted({int(name.rsplit("-seed", 1)[1]) for name in curves})
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.5, 3.8), layout="constrained")
    for name, metrics in curves.items():
        if not metrics.exists():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        points = [(row["step"], row["loss"]) for row in rows if "loss" in row]
        condition, seed = name.rsplit("-seed", 1)
        style = styles[seeds.index(int(seed)) % len(styles)]
        ax.plot(*zip(*points), style, color=f"C{conditions.index(condition)}", label=name)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (answer + end-of-turn)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results/babi_scratch")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--policies", nargs="+", default=["causal", "mas", "prefix"])
    args = parser.parse_args()
    result = summarize(Path(args.results), args.tasks, args.seeds, args.policies)
    print(json.dumps(result, indent=2))
    sys.exit(0)
