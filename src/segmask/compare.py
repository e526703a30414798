"""Compare evaluation runs: a markdown table, a grouped bar chart, and paired McNemar tests.

    segmask compare runs/causal.json runs/mas.json --out-md runs/compare.md --out-png runs/compare.png

Rows are tasks (the unweighted average last), columns are runs, each cell the accuracy with its 95% Wilson
interval. Every run after the first is tested against the first, per task, with McNemar's exact test on the
records both runs scored (matched by record index, with equal gold labels): under the null hypothesis the
discordant records (right in one run, wrong in the other) split 50/50, so the p-value is a two-sided
binomial test on them. A small p-value says the difference is unlikely to be noise.

Every number of the table is over the same records (:func:`align`): the tasks every run scored and, within a
task, the records every run scored (matched by index; without a predictions file, a task's records count as
the same only where every run scored as many). A task or record that some run lacks is left out and the
table says so below it (``dropped 15 records of task boolq only in a``): a run with ``--limit 20`` against one
with ``--limit 5`` is compared on the 5 shared records, and the average is over the shared tasks. Runs
scored differently (``generate`` against ``loglik``) are refused: their accuracies measure different things.

McNemar treats one trained model as fixed, so it measures test-set noise only. Where several training seeds
exist the seed is the unit of replication: :func:`over_seeds` gives the mean with its 95 % t interval and
:func:`paired_t` the two-sided t-test of the seed-level differences (same seed, two conditions) against 0.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scipy import stats
from scipy.stats import binomtest

from segmask.files import check_outputs, read_json
from segmask.results import predictions_path, wilson_interval

SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Run:
    """A results JSON and, when its predictions file exists, per-record correctness ``{task: {index: (gold, ok)}}``."""

    name: str
    path: Path
    results: dict
    records: dict[str, dict[int, tuple[str, bool]]] | None


@dataclass(frozen=True)
class McNemar:
    """Paired comparison of run B against run A on ``n`` shared records.

    ``only_a``: records A got right and B wrong; ``only_b``: the reverse. ``p_value``: exact two-sided.
    """

    n: int
    only_a: int
    only_b: int
    p_value: float


def load_run(path: str | Path) -> Run:
    """Read a results JSON written by :func:`segmask.evaluation.evaluate` and its predictions JSONL."""
    path = Path(path)
    results = read_json(path, "results")
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict) or not results["tasks"]:
        raise ValueError(f"{path}: not a segmask results file (no 'tasks')")
    for task, score in results["tasks"].items():
        missing = [key for key in ("accuracy", "ci_low", "ci_high", "n") if key not in score]
        if missing:
            raise ValueError(f"{path}: task {task!r} lacks {missing}")
    # evaluate records the predictions file's name; older files follow its naming rule
    jsonl = path.parent / (results.get("predictions") or f"{path.stem}.predictions.jsonl")
    return Run(path.stem, path, results, _read_records(jsonl) if jsonl.is_file() else None)


def _read_records(path: Path) -> dict[str, dict[int, tuple[str, bool]]]:
    records: dict[str, dict[int, tuple[str, bool]]] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                records.setdefault(row["task"], {})[int(row["index"])] = (
                    row["gold"],
                    row["prediction"] == row["gold"],
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}: line {line_number}: not a prediction record ({error!r})") from None
    return records


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """McNemar's exact test on paired outcomes ``a[i]``, ``b[i]`` (True: record ``i`` answered correctly)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    discordant = only_a + only_b
    p_value = 1.0 if discordant == 0 else float(binomtest(only_b, discordant, 0.5).pvalue)
    return McNemar(len(a), only_a, only_b, p_value)


def _check_golds(base: Run, other: Run, task: str, indices: Sequence[int]) -> None:
    """Refuse records of ``task`` that the two runs give different gold labels: the data differ."""
    a, b = base.records[task], other.records[task]  # type: ignore[index]
    for index in indices:
        if a[index][0] != b[index][0]:
            raise ValueError(
                f"task {task!r} record {index}: gold {a[index][0]!r} in {base.path} but {b[index][0]!r} in "
                f"{other.path}; the runs did not use the same data"
            )


def shared_outcomes(base: Run, other: Run, task: str) -> tuple[list[bool], list[bool]] | None:
    """Paired correctness on the records of ``task`` both runs scored; ``None`` without predictions for both."""
    if base.records is None or other.records is None:
        return None
    a, b = base.records.get(task, {}), other.records.get(task, {})
    shared = sorted(set(a) & set(b))
    _check_golds(base, other, task, shared)
    return [a[i][1] for i in shared], [b[i][1] for i in shared]


def paired_test(base: Run, other: Run, tasks: Sequence[str]) -> McNemar | None:
    """McNemar on the records of ``tasks`` (pooled) both runs scored, or ``None`` without predictions."""
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of task names, got the string {tasks!r}")
    a: list[bool] = []
    b: list[bool] = []
    for task in tasks:
        outcomes = shared_outcomes(base, other, task)
        if outcomes is None:
            return None
        a += outcomes[0]
        b += outcomes[1]
    return mcnemar(a, b)


def check_scoring(runs: Sequence[Run]) -> None:
    """Refuse runs scored differently (``generate`` against ``loglik``): one measures whether generated text
    names the label, the other which candidate is likeliest; their difference is no effect of the mask."""
    kinds = {str(run.results["scoring"]) for run in runs if run.results.get("scoring") is not None}
    if len(kinds) > 1:
        listing = ", ".join(f"{run.path}: {run.results.get('scoring') or 'unknown'}" for run in runs)
        raise ValueError(
            f"the runs were scored differently ({listing}); compare runs of one scoring (generate or loglik)"
        )


@dataclass(frozen=True)
class Alignment:
    """What runs are compared on (:func:`align`).

    ``tasks``: the tasks compared, in order of first appearance. ``indices[task]``: the record indices every
    run scored, or ``None`` where some run has no predictions (then every run's whole task, all of one size).
    ``scores[r][task]``: run ``r``'s ``accuracy``, ``ci_low``, ``ci_high`` (95% Wilson) and ``n`` on them;
    ``averages[r]``: its unweighted mean over ``tasks`` (``None`` without tasks). ``dropped``: a sentence
    per task or group of records left out.
    """

    tasks: list[str]
    indices: dict[str, list[int] | None]
    scores: list[dict[str, dict]]
    averages: list[float | None]
    dropped: list[str]


def _score(correct: int, n: int) -> dict:
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n, "ci_low": low, "ci_high": high, "n": n}


def align(runs: Sequence[Run]) -> Alignment:
    """The tasks and records every run scored, each run's scores on them, and what was left out.

    Records are matched by index (their gold labels must agree, else a ``ValueError``). A task some run
    lacks is dropped; so is a record some run did not score (a smaller ``--limit``, a skipped record), and a
    task whose sizes differ where some run has no predictions to match its records by. Refuses runs of
    different scorings (:func:`check_scoring`).
    """
    check_scoring(runs)
    base = runs[0]
    tasks: list[str] = []
    indices: dict[str, list[int] | None] = {}
    scores: list[dict[str, dict]] = [{} for _ in runs]
    dropped: list[str] = []
    for task in dict.fromkeys(task for run in runs for task in run.results["tasks"]):
        holders = [run.name for run in runs if task in run.results["tasks"]]
        if len(holders) < len(runs):
            dropped.append(f"dropped task {task}: only in {', '.join(holders)}")
            continue
        if all(run.records is not None for run in runs):
            found = [set(run.records.get(task, {})) for run in runs]  # type: ignore[union-attr]
            shared = sorted(set.intersection(*found))
            for run, own in zip(runs, found):
                if len(own) > len(shared):
                    where = f"only in {run.name}" if len(runs) == 2 else f"of {run.name} not in every run"
                    extra = len(own) - len(shared)
                    dropped.append(f"dropped {extra} record{'s' * (extra > 1)} of task {task} {where}")
            if not shared:
                dropped.append(f"dropped task {task}: no record that every run scored")
                continue
            for run in runs[1:]:
                _check_golds(base, run, task, shared)
            for run, run_scores in zip(runs, scores):
                outcomes = run.records[task]  # type: ignore[index]
                run_scores[task] = _score(sum(outcomes[i][1] for i in shared), len(shared))
            indices[task] = shared
        else:
            sizes = [run.results["tasks"][task]["n"] for run in runs]
            if len(set(sizes)) > 1:
                counts = ", ".join(f"{n} in {run.name}" for run, n in zip(runs, sizes))
                lacking = ", ".join(run.name for run in runs if run.records is None)
                dropped.append(
                    f"dropped task {task}: {counts}, and no predictions of {lacking} to match the records by"
                )
                continue
            for run, run_scores in zip(runs, scores):
                score = run.results["tasks"][task]
                run_scores[task] = {key: score[key] for key in ("accuracy", "ci_low", "ci_high", "n")}
            indices[task] = None
        tasks.append(task)
    averages = [statistics.fmean(s[task]["accuracy"] for task in tasks) if tasks else None for s in scores]
    return Alignment(tasks, indices, scores, averages, dropped)


def aligned_test(aligned: Alignment, base: Run, other: Run, tasks: Sequence[str]) -> McNemar | None:
    """McNemar of ``other`` against ``base`` on the aligned records of ``tasks`` (pooled); ``None`` where
    a task has no predictions to pair."""
    a: list[bool] = []
    b: list[bool] = []
    for task in tasks:
        shared = aligned.indices[task]
        if shared is None:
            return None
        a += [base.records[task][i][1] for i in shared]  # type: ignore[index]
        b += [other.records[task][i][1] for i in shared]  # type: ignore[index]
    return mcnemar(a, b)


# ------------------------------------------------------------------------------ seeds as the unit


def over_seeds(values: list[float]) -> dict:
    """Mean, 95 % t interval (None below 2 values) and the number of seeds."""
    n = len(values)
    if n == 0:
        return {"n_seeds": 0, "mean": None, "ci_low": None, "ci_high": None}
    mean = statistics.fmean(values)
    if n < 2:
        return {"n_seeds": 1, "mean": mean, "ci_low": None, "ci_high": None}
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"n_seeds": n, "mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def paired_t(differences: list[float]) -> dict:
    """Two-sided one-sample t-test of the seed-level differences against 0 (= paired t); None below 2."""
    result = over_seeds(differences) | {
        "t": None,
        "p_value": None,
        "test": "paired t on seed-level differences",
    }
    if len(differences) >= 2:
        # accuracies are k/n: differences equal up to float rounding have no variance, and the t-test is
        # undefined there (a p-value of 1e-14 from rounding noise would be an artefact, not evidence)
        if statistics.stdev(differences) < 1e-9:
            result["undefined"] = "every seed's difference is the same: no variance between seeds"
        else:
            test = stats.ttest_1samp(differences, 0.0)
            result["t"], result["p_value"] = float(test.statistic), float(test.pvalue)
    return result


def percent_text(value: float | None, signed: bool = False) -> str:
    """A proportion in percent with one decimal (``+`` before positive ones when ``signed``); "–" for None."""
    if value is None:
        return "–"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def interval_text(summary: dict, signed: bool = False) -> str:
    """``mean [low, high]`` in percent of an :func:`over_seeds` or :func:`paired_t` summary (the interval
    only from 2 seeds on; "–" without a mean); ``signed`` for differences."""
    text = percent_text(summary["mean"], signed)
    if summary["mean"] is not None and summary["ci_low"] is not None:
        text += f" [{percent_text(summary['ci_low'], signed)}, {percent_text(summary['ci_high'], signed)}]"
    return text


def p_text(test: dict, n: int) -> str:
    """The p-value cell of a paired t-test over ``n`` seeds."""
    if test.get("undefined"):
        return f"undefined (n={n}: {test['undefined']})"
    if test["p_value"] is None:
        return "– (needs 2 seeds)"
    return f"{test['p_value']:.3g} (df={n - 1})"


def _cell(score: dict | None) -> str:
    if score is None:
        return "–"
    return f"{100 * score['accuracy']:.1f} [{100 * score['ci_low']:.1f}, {100 * score['ci_high']:.1f}]"


def _test_cell(base: float | None, other: float | None, test: McNemar | None) -> str:
    if base is None or other is None:
        return "–"
    delta = 100 * (other - base)
    if test is None:
        return f"{delta:+.1f} (no predictions)"
    star = "*" if test.p_value < SIGNIFICANCE else ""
    return f"{delta:+.1f}, p={test.p_value:.3g}{star} ({test.only_b}/{test.only_a} of {test.n})"


def table(runs: Sequence[Run]) -> str:
    """The markdown comparison table (see the module docstring), on the records of :func:`align`."""
    aligned = align(runs)
    base = runs[0]
    header = ["task", *(run.name for run in runs), *(f"{run.name} vs {base.name}" for run in runs[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in aligned.tasks:
        scores = [run_scores[task] for run_scores in aligned.scores]
        cells = [f"{task} (n={scores[0]['n']})", *(_cell(score) for score in scores)]
        for run, score in zip(runs[1:], scores[1:]):
            test = aligned_test(aligned, base, run, [task])
            cells.append(_test_cell(scores[0]["accuracy"], score["accuracy"], test))
        lines.append("| " + " | ".join(cells) + " |")
    averages = aligned.averages
    cells = ["**average**", *(f"**{100 * a:.1f}**" if a is not None else "–" for a in averages)]
    for run, average in zip(runs[1:], averages[1:]):
        test = aligned_test(aligned, base, run, aligned.tasks) if aligned.tasks else None
        cells.append(_test_cell(averages[0], average, test) + (" pooled" if test is not None else ""))
    lines.append("| " + " | ".join(cells) + " |")
    if len(runs) > 1:
        lines.append("")
        lines.append(
            f"Accuracy in % [95% Wilson interval] on the records every run scored. Last columns: difference "
            f"against {base.name}, McNemar exact p-value on those records (* p < {SIGNIFICANCE}), records "
            f"right only in that run / only in {base.name}, of them. Average: unweighted mean over the tasks "
            f"every run scored; its test pools their records."
        )
    if aligned.dropped:
        lines.append("")
        lines += [f"- {sentence}" for sentence in aligned.dropped]
    return "\n".join(lines) + "\n"


def bar_chart(runs: Sequence[Run], out: str | Path) -> Path:
    """A grouped bar chart PNG: tasks on the x axis, one bar per run, 95% intervals as error bars; on the
    tasks and records of :func:`align`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    aligned = align(runs)
    tasks = aligned.tasks
    groups = [*tasks, "average"]
    width = 0.8 / len(runs)
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.0), layout="constrained")
    for offset, run in enumerate(runs):
        values, low, high = [], [], []
        for task in tasks:
            score = aligned.scores[offset][task]
            values.append(score["accuracy"])
            low.append(score["accuracy"] - score["ci_low"])
            high.append(score["ci_high"] - score["accuracy"])
        average = aligned.averages[offset]
        values.append(np.nan if average is None else average)
        positions = x - 0.4 + width * (offset + 0.5)
        ax.bar(positions, 100 * np.array(values), width, label=run.name)
        ax.errorbar(
            positions[:-1],
            100 * np.array(values[:-1]),
            yerr=100 * np.array([low, high]),
            fmt="none",
            ecolor="black",
            capsize=2,
        )
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.axvline(len(tasks) - 0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.legend(fontsize="small")
    ax.set_title("accuracy with 95% Wilson intervals")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def compare_runs(
    paths: Sequence[str | Path], out_md: str | Path | None = None, out_png: str | Path | None = None
) -> str:
    """Load the runs at ``paths`` and return the markdown table; also write it and the bar chart when asked.

    Raises ``ValueError`` before reading anything when an output would overwrite an input (a results file
    or its predictions) or both outputs are one file."""
    if not paths:
        raise ValueError("compare needs at least one results file")
    inputs = [*paths, *(predictions_path(path) for path in paths)]
    check_outputs([("out_md", out_md), ("out_png", out_png)], inputs)
    runs = [load_run(path) for path in paths]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # same stem in different folders: name runs by their paths
        runs = [Run(str(run.path), run.path, run.results, run.records) for run in runs]
    markdown = table(runs)
    if out_md is not None:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(out_md).write_text(markdown, encoding="utf-8")
    if out_png is not None:
        bar_chart(runs, out_png)
    return markdown
