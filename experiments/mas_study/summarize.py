"""Tables and figures of the MAS study, from whatever units are finished (partial results are fine).

    python experiments/mas_study/summarize.py [--out results/mas_study]
    python experiments/mas_study/summarize.py --out results/mas_study_long --long-arm

Writes ``summary.md``, ``summary.json``, ``interaction.png`` and ``curves.png`` into ``--out``. The
pre-registered endpoint (``results/mas_study/README.md``), per task:

- for each question position (after / first) and each mas variant (``mas``: the paper's mask, ``mas_sink``):
  the difference of final held-out accuracy (own mask) from ``causal``, per seed, then the mean over seeds
  with a 95 % t interval and the paired t-test (seed-level differences, two-sided, n - 1 df);
- the interaction: per seed, gain with the question after minus gain with the question first (the same
  training seed, the same items), mean with its 95 % t interval and the one-sample t-test.

Per seed, McNemar's exact test of each variant against causal on the same held-out items is the detail.
The secondary analyses (described, not tested for a decision) follow: each condition's accuracy with the
question after minus first, the accuracy at the checkpoints, and for the reading task the gains on one-hop
and two-hop questions apart. Every number says how many seeds it rests on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402
from run import CONDITIONS, DEFAULT_OUT, LAYOUTS, demo_study  # noqa: E402

from segmask.compare import interval_text, mcnemar, over_seeds, p_text, paired_t, percent_text  # noqa: E402

VARIANTS = ("mas", "mas_sink")


def load_units(out: Path) -> tuple[dict, dict]:
    """({(task, layout, condition, seed): unit.json}, {same key: curve rows}) under ``out/runs``."""
    finished, curves = {}, {}
    for folder in sorted((out / "runs").glob("*/*/*/seed*")):
        task, layout, condition = folder.parts[-4:-1]
        key = (task, layout, condition, int(folder.name[4:]))
        curves[key] = demo_study.read_curve(folder / "curve.jsonl")
        if (folder / "unit.json").exists():
            finished[key] = json.loads((folder / "unit.json").read_text())
    return finished, curves


def own(unit: dict) -> float:
    return unit["final"][unit["own_mask"]]["accuracy"]


def interval(summary: dict, signed: bool = False) -> str:
    if summary["mean"] is None:
        return "– (0 seeds)"
    n = summary["n_seeds"]
    return interval_text(summary, signed) + f" (n={n} seed{'s' if n != 1 else ''})"


def paired(finished: dict, cell: tuple, base_cell: tuple, score=None) -> dict[int, float]:
    """{seed: score(cell's unit) - score(base_cell's unit)} over the seeds where both units are finished;
    a cell is ``(task, layout, condition)``, ``score`` a unit's number (default: own-mask accuracy)."""
    score = score or own
    return {
        seed: score(unit) - score(finished[(*base_cell, seed)])
        for (*key, seed), unit in finished.items()
        if tuple(key) == cell and (*base_cell, seed) in finished
    }


def gains(finished: dict, task: str, layout: str, variant: str, base: str = "causal") -> dict[int, float]:
    """{seed: acc(variant) - acc(base)} over the seeds where both units are finished."""
    return paired(finished, (task, layout, variant), (task, layout, base))


def above_zero(test: dict) -> bool | None:
    """Whether a 95 % t interval lies above 0; None without one (under 2 seeds)."""
    return None if test["ci_low"] is None else test["ci_low"] > 0


def reading_of(after: dict, first: dict, interaction: dict) -> str:
    """The pre-registered reading (``results/mas_study/README.md``) of one variant on one task."""
    if any(test["ci_low"] is None for test in (after, first, interaction)):
        return "not yet computable (needs 2 or more seeds in every cell)"
    if above_zero(after) and above_zero(interaction):
        return "MAS helps through the mechanism"
    if above_zero(after) and above_zero(first) and interaction["ci_low"] <= 0 <= interaction["ci_high"]:
        return "MAS helps, but not through this mechanism"
    return "null"


def default_decision(result: dict) -> str:
    """The pre-registered rule for the default of ``mas``: the paper's mask replaces the sink only if
    ``acc(mas) - acc(mas_sink)`` with the question after has a 95 % t interval above 0 on both tasks."""
    tests = [result["tasks"].get(task, {}).get("mas_vs_sink_after") for task in ("family", "reading")]
    if any(test is None or test["ci_low"] is None for test in tests):
        return "not yet decidable (needs 2 or more seeds of both variants on both tasks); the default stays"
    if all(above_zero(test) for test in tests):
        return "the paper's mask beats the sink on both tasks: make it the default"
    return "the paper's mask does not beat the sink on both tasks: the default (the sink) stays"


def answer_table(result: dict) -> list[str]:
    """The endpoint in one table per task and variant, as the top-level README quotes it (a test checks
    that the README carries these lines for the committed ``summary.json``)."""
    lines = [
        "| task | variant | seeds | gain, question after | gain, question first | interaction (after − first) "
        "| pre-registered reading |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(test: dict) -> str:
        p = "–" if test.get("p_value") is None else f"{test['p_value']:.2g}"
        return f"{interval_text(test, True)}, p {p}"

    for task, entry in sorted(result["tasks"].items()):
        for variant in VARIANTS:
            tests = [entry["gain"][variant]["after"], entry["gain"][variant]["first"]]
            tests.append(entry["interaction"][variant])
            seeds = "/".join(str(n) for n in sorted({test["n_seeds"] for test in tests}))
            lines.append(
                f"| {task} | `{variant}` | {seeds} | "
                + " | ".join(cell(test) for test in tests)
                + f" | {entry['reading'][variant]} |"
            )
    return lines


def checkpoint_accuracy(unit: dict) -> dict[int, float]:
    """{step: accuracy under the unit's own mask} at the checkpoints (the first ``acc_size`` held-out items),
    and at the last step the final accuracy (all held-out items)."""
    points = {
        row["step"]: row["accuracy"]
        for row in unit.get("curve", [])
        if row.get("kind") == "accuracy" and row.get("mask") == unit["own_mask"]
    }
    steps = unit.get("settings", {}).get("steps")
    if steps is not None:
        points[steps] = own(unit)
    return points


def question_kinds(out: Path, settings: dict) -> list[str] | None:
    """For the reading task, ``"two-hop"`` or ``"one-hop"`` per held-out item of ``settings["layout"]``,
    in the order of a unit's correct bits; None for another task or a unit without its settings.

    The items are drawn again as the runner draws them (:func:`run.prepare_data`), and must hash to the
    unit's ``data_sha256``."""
    if settings.get("task_spec", {}).get("source") != "segmask.tasks.reading":
        return None
    sizes = argparse.Namespace(**{k: settings[k] for k in ("train_size", "test_size", "data_seed")})
    folder, digest = run.prepare_data(sizes, out, settings["task"])
    if digest != settings["data_sha256"]:
        raise ValueError(f"{folder} does not hold the items the units were trained and tested on")
    records = json.loads((folder / settings["layout"] / f"{settings['task']}_test.json").read_text())
    return ["two-hop" if "Question: Where is the " in r["instruction"] else "one-hop" for r in records]


def kind_gains(finished: dict, task: str, layout: str, variant: str, kinds: list[str], kind: str) -> dict:
    """{seed: acc(variant) - acc(causal)} on the held-out items of one ``kind`` only (own masks)."""
    picked = [i for i, k in enumerate(kinds) if k == kind]

    def on_kind(unit: dict) -> float:
        bits = unit["final"][unit["own_mask"]]["correct_bits"]
        return sum(bits[i] == "1" for i in picked) / len(picked)

    return paired(finished, (task, layout, variant), (task, layout, "causal"), on_kind)


def secondary(out: Path, finished: dict, task: str, entry: dict) -> list[str]:
    """The secondary analyses of the pre-registration (described, not tested for a decision): each
    condition's accuracy with the question after minus first, the checkpoint accuracies, and for the
    reading task the gains on one-hop and two-hop items apart. Fills ``entry["secondary"]``."""
    found = entry["secondary"] = {"order": {}, "checkpoints": {}, "by_question_kind": {}}
    lines = ["", "### Secondary (described, not tested for a decision)", ""]
    lines += ["Question after minus question first, per condition (paired by seed, points):", ""]
    lines += ["| condition | per seed | mean [95 % t] |", "|---|---|---|"]
    for condition in CONDITIONS:
        diffs = paired(finished, (task, "after", condition), (task, "first", condition))
        found["order"][condition] = over_seeds(list(diffs.values())) | {"per_seed": diffs}
        seeds_text = ", ".join(f"{s}: {100 * d:+.1f}" for s, d in sorted(diffs.items())) or "–"
        lines.append(f"| {condition} | {seeds_text} | {interval(found['order'][condition], True)} |")
    steps = sorted({step for k, u in finished.items() if k[0] == task for step in checkpoint_accuracy(u)})
    if steps:
        sizes = {u["settings"]["acc_size"] for k, u in finished.items() if k[0] == task and "settings" in u}
        lines += [
            "",
            "Accuracy at the checkpoints, own mask, mean over seeds (the last step: the final accuracy on every "
            f"held-out item; the others: on the first {' or '.join(map(str, sorted(sizes))) or 'few'} of them):",
            "",
        ]
        lines += ["| question | condition | " + " | ".join(f"step {s}" for s in steps) + " |"]
        lines.append("|---|---|" + "---|" * len(steps))
        for layout in LAYOUTS:
            for condition in CONDITIONS:
                points = [
                    checkpoint_accuracy(u) for k, u in finished.items() if k[:3] == (task, layout, condition)
                ]
                cells = []
                for step in steps:
                    summary = over_seeds([p[step] for p in points if step in p])
                    found["checkpoints"].setdefault(layout, {}).setdefault(condition, {})[step] = summary
                    cells.append(percent_text(summary["mean"]) + f" (n={summary['n_seeds']})")
                lines.append(f"| {layout} | {condition} | " + " | ".join(cells) + " |")
    units = [u for k, u in sorted(finished.items()) if k[0] == task]
    kinds = {layout: None for layout in LAYOUTS}
    for layout in LAYOUTS:
        settings = next(
            (u.get("settings") for u in units if u.get("settings", {}).get("layout") == layout), None
        )
        kinds[layout] = None if settings is None else question_kinds(out, settings)
    if any(kinds.values()):
        lines += ["", "Gain over causal on one-hop and two-hop questions apart (points, paired by seed):", ""]
        lines += ["| variant | question | items | per seed | mean [95 % t] |", "|---|---|---|---|---|"]
        for variant in VARIANTS:
            for layout in LAYOUTS:
                if kinds[layout] is None:
                    continue
                for kind in ("one-hop", "two-hop"):
                    diffs = kind_gains(finished, task, layout, variant, kinds[layout], kind)
                    summary = over_seeds(list(diffs.values())) | {"per_seed": diffs}
                    found["by_question_kind"].setdefault(variant, {}).setdefault(layout, {})[kind] = summary
                    seeds_text = ", ".join(f"{s}: {100 * d:+.1f}" for s, d in sorted(diffs.items())) or "–"
                    count = kinds[layout].count(kind)
                    lines.append(
                        f"| {variant} | {layout} | {kind} ({count}) | {seeds_text} | {interval(summary, True)} |"
                    )
    return [*lines, ""]


def long_arm_reading(entry: dict, seeds: tuple[int, ...] = (0, 1)) -> str:
    """The registered reading of the exploratory longer-budget arm (``results/mas_study/README.md``): with
    ``d(s) = acc(mas) - acc(causal)`` (question after, own masks) and McNemar's p per seed, MAS catches up if
    ``d(s) >= 0`` in both seeds, still trails if ``d(s) < 0`` with p < 0.05 in both, else unresolved."""
    gains_after = entry["gain"]["mas"]["after"]["per_seed"]
    tests = {seed: entry["mcnemar"].get(f"mas/after/{seed}") for seed in seeds}
    if any(seed not in gains_after or tests[seed] is None for seed in seeds):
        return "not yet readable (needs both seeds of causal and mas)"
    if all(gains_after[seed] >= 0 for seed in seeds):
        return "MAS catches up"
    if all(gains_after[seed] < 0 and tests[seed]["p_value"] < 0.05 for seed in seeds):
        return "MAS still trails"
    return "unresolved"


def summarize(out: Path, long_arm: bool = False) -> dict:
    finished, curves = load_units(out)
    tasks = sorted({key[0] for key in curves})
    lines = ["# MAS study: summary", "", f"{len(finished)} units finished.", ""]
    result: dict = {"units_finished": len(finished), "tasks": {}}

    for task in tasks:
        entry: dict = {"accuracy": {}, "gain": {}, "interaction": {}, "mcnemar": {}, "cross_mask": {}}
        lines += [f"## {task}", "", "### Final held-out accuracy, own mask (mean over seeds [95 % t])", ""]
        lines += ["| condition | " + " | ".join(f"question {lay}" for lay in LAYOUTS) + " |", "|---|---|---|"]
        for condition in CONDITIONS:
            cells = []
            for layout in LAYOUTS:
                values = {k[3]: own(u) for k, u in finished.items() if k[:3] == (task, layout, condition)}
                summary = over_seeds(list(values.values())) | {"per_seed": values}
                entry["accuracy"].setdefault(condition, {})[layout] = summary
                cells.append(interval(summary))
            lines.append(f"| {condition} | " + " | ".join(cells) + " |")
        lines += ["", "### Endpoint: gain over causal (paired by seed) and the interaction", ""]
        lines += [
            "| variant | question | per seed (points) | mean [95 % t] | paired t p |",
            "|---|---|---|---|---|",
        ]
        for variant in VARIANTS:
            per_layout = {}
            for layout in LAYOUTS:
                diffs = gains(finished, task, layout, variant)
                per_layout[layout] = diffs
                test = paired_t(list(diffs.values())) | {"per_seed": diffs}
                entry["gain"].setdefault(variant, {})[layout] = test
                seeds_text = ", ".join(f"{s}: {100 * d:+.1f}" for s, d in sorted(diffs.items())) or "–"
                lines.append(
                    f"| {variant} | {layout} | {seeds_text} | {interval(test, True)} | {p_text(test, len(diffs))} |"
                )
            both = sorted(set(per_layout["after"]) & set(per_layout["first"]))
            inter = {s: per_layout["after"][s] - per_layout["first"][s] for s in both}
            test = paired_t(list(inter.values())) | {"per_seed": inter}
            entry["interaction"][variant] = test
            seeds_text = ", ".join(f"{s}: {100 * d:+.1f}" for s, d in inter.items()) or "–"
            lines.append(
                f"| {variant} | after − first | {seeds_text} | {interval(test, True)} | {p_text(test, len(inter))} |"
            )
        lines += ["", "Pre-registered reading, per variant:", ""]
        entry["reading"] = {}
        for variant in VARIANTS:
            gain = entry["gain"][variant]
            entry["reading"][variant] = reading_of(
                gain["after"], gain["first"], entry["interaction"][variant]
            )
            lines.append(f"- `{variant}`: {entry['reading'][variant]}")
        diffs = gains(finished, task, "after", "mas", base="mas_sink")  # the paper's mask against the sink
        entry["mas_vs_sink_after"] = paired_t(list(diffs.values())) | {"per_seed": diffs}
        seeds_text = ", ".join(f"{s}: {100 * d:+.1f}" for s, d in sorted(diffs.items())) or "–"
        lines.append(
            f"- the paper's mask against the sink, question after (`mas` − `mas_sink`): {seeds_text}; "
            f"{interval(entry['mas_vs_sink_after'], True)}; p {p_text(entry['mas_vs_sink_after'], len(diffs))}"
        )
        lines += ["", "### Per seed: McNemar against causal on the same held-out items", ""]
        lines += [
            "| variant | question | seed | right only in it / only in causal | p |",
            "|---|---|---|---|---|",
        ]
        for variant in VARIANTS:
            for layout in LAYOUTS:
                for (t, lay, condition, seed), unit in sorted(finished.items()):
                    base = finished.get((task, layout, "causal", seed))
                    if (t, lay, condition) != (task, layout, variant) or base is None:
                        continue
                    a = [c == "1" for c in base["final"]["causal"]["correct_bits"]]
                    b = [c == "1" for c in unit["final"][variant]["correct_bits"]]
                    test = mcnemar(a, b)
                    entry["mcnemar"][f"{variant}/{layout}/{seed}"] = {
                        "only_causal": test.only_a,
                        "only_variant": test.only_b,
                        "p_value": test.p_value,
                    }
                    lines.append(
                        f"| {variant} | {layout} | {seed} | {test.only_b} / {test.only_a} | {test.p_value:.3g} |"
                    )
        lines += ["", "### Cross-mask evaluation of the final adapters (mean over seeds)", ""]
        lines += [
            "| question | trained \\ evaluated | " + " | ".join(CONDITIONS) + " |",
            "|---|---|---|---|---|",
        ]
        for layout in LAYOUTS:
            for condition in CONDITIONS:
                cells = []
                for mask in CONDITIONS:
                    values = [
                        u["final"][mask]["accuracy"]
                        for k, u in finished.items()
                        if k[:3] == (task, layout, condition) and mask in u["final"]
                    ]
                    summary = over_seeds(values)
                    entry["cross_mask"].setdefault(layout, {}).setdefault(condition, {})[mask] = summary
                    cells.append(percent_text(summary["mean"]) + f" (n={summary['n_seeds']})")
                lines.append(f"| {layout} | {condition} | " + " | ".join(cells) + " |")
        lines += secondary(out, finished, task, entry)
        if long_arm:
            entry["long_arm_reading"] = long_arm_reading(entry)
            lines += [
                "",
                f"Registered reading of the longer-budget arm: **{entry['long_arm_reading']}**.",
                "",
            ]
        leaks = [max(u["leak_check_final"].values()) for k, u in finished.items() if k[0] == task]
        cpu = [u["cpu_time_s"]["total"] for k, u in finished.items() if k[0] == task]
        if cpu:
            lines += [
                "",
                f"Leak check: every finished unit passed (largest change {max(leaks):.2g}). CPU time per unit: "
                f"{min(cpu) / 60:.1f}-{max(cpu) / 60:.1f} min, {sum(cpu) / 3600:.2f} CPU-h in all (a unit resumed "
                f"from its checkpoint counts only the time after the resume).",
            ]
        lines.append("")
        result["tasks"][task] = entry

    result["default_of_mas"] = default_decision(result)
    if not long_arm:  # the long arm has one layout and one variant: no endpoint table
        lines += ["## The endpoint in one table (points: mean over seeds [95 % t], two-sided paired t p)", ""]
        lines += [*answer_table(result), ""]
    lines += ["## The default of `mas` (pre-registered rule)", "", result["default_of_mas"] + ".", ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot_interaction(result, out / "interaction.png")
    plot_curves(curves, out / "curves.png", finished)
    return result


def plot_interaction(result: dict, path: Path) -> None:
    """Gain over causal against the question position, one panel per task, seeds as dots, means as lines."""
    tasks = sorted(result["tasks"])
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for offset, (variant, colour) in zip((-0.06, 0.06), zip(VARIANTS, ("tab:blue", "tab:orange"))):
            means = []
            for x, layout in enumerate(LAYOUTS):
                test = result["tasks"][task]["gain"][variant][layout]
                values = [100 * v for v in test["per_seed"].values()]
                ax.scatter([x + offset] * len(values), values, color=colour, alpha=0.6, s=18)
                means.append(None if test["mean"] is None else 100 * test["mean"])
            xs = [x + offset for x, m in enumerate(means) if m is not None]
            ax.plot(xs, [m for m in means if m is not None], color=colour, marker="_", label=variant)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(LAYOUTS)), [f"question {lay}" for lay in LAYOUTS])
        ax.set_ylabel("final accuracy minus causal (points)")
        ax.set_title(task)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict, path: Path, finished: dict | None = None) -> None:
    """Held-out loss (top) and accuracy at the checkpoints (bottom) per (task, layout), a line per unit; a
    finished unit's line ends at its final accuracy (own mask, every held-out item)."""
    finished = finished or {}
    panels = sorted({key[:2] for key in curves})
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 7), squeeze=False)
    colours = dict(zip(CONDITIONS, ("tab:green", "tab:blue", "tab:orange")))
    for column, (task, layout) in enumerate(panels):
        for (t, lay, condition, seed), rows in sorted(curves.items()):
            if (t, lay) != (task, layout):
                continue
            label = condition if seed == min(k[3] for k in curves if k[:3] == (t, lay, condition)) else None
            loss = [r for r in rows if r["kind"] == "loss"]
            unit = finished.get((t, lay, condition, seed))
            points = (
                checkpoint_accuracy(unit)
                if unit is not None
                else {r["step"]: r["accuracy"] for r in rows if r["kind"] == "accuracy"}
            )
            acc = [{"step": step, "accuracy": value} for step, value in sorted(points.items())]
            axes[0][column].plot([r["step"] for r in loss], [r["loss"] for r in loss], color=colours[condition],
                                 alpha=0.7, label=label)  # fmt: skip
            axes[1][column].plot([r["step"] for r in acc], [100 * r["accuracy"] for r in acc],
                                 color=colours[condition], alpha=0.7, marker="o", label=label)  # fmt: skip
        axes[0][column].set_yscale("log")
        axes[0][column].set_title(f"{task}, question {layout}")
        axes[0][column].set_ylabel("held-out loss per answer token")
        axes[1][column].set_ylabel("held-out accuracy (%; last point: final, all items)")
        axes[1][column].set_xlabel("step")
        axes[0][column].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument(
        "--long-arm",
        action="store_true",
        help="also give the registered reading of the exploratory longer-budget arm (results/mas_study_long)",
    )
    args = parser.parse_args(argv)
    summarize(Path(args.out), args.long_arm)
    print((Path(args.out) / "summary.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
