"""The paper's experiment at CPU scale: LoRA on SmolLM2-135M-Instruct, causal against MAS, commonsense suite.

Full run (measured on a loaded 2-core VM: 1.8-2 h per training and about 2.1 h per model's evaluation, one
thread each, so about 10 core-hours; every stage resumes where it stopped, so run it again after an
interruption, or run stages side by side with ``--models``, see experiments/README.md)::

    python experiments/commonsense_cpu/run.py

Reduced run (clearly labelled as such in every file it writes)::

    python experiments/commonsense_cpu/run.py --max-steps 20 --limit 40 --results results/commonsense_cpu_reduced

Stages, each skipped when its output exists:

1. train: ``segmask train configs/cpu_smollm2.yaml --mask {causal,mas}`` (the fixed-seed mixture of the
   ARC-Easy, ARC-Challenge, OpenBookQA, BoolQ and Social IQa train files that the config names; identical
   steps, seed and hyperparameters for both policies; checkpoints every ``save_steps``, resumed);
2. leak check: :func:`segmask.leaks.leak_check` on each fine-tuned model, before any number is reported;
3. eval: ``segmask eval`` of base (causal), causal and MAS on the test files of the five tasks, one task
   at a time (a finished task is never redone);
4. compare: per-model results merged; ``segmask compare`` of base, causal and MAS (``table.md``,
   ``accuracy.png``) and of MAS against causal alone (``mas_vs_causal.md``), with Wilson intervals and
   McNemar's paired test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from segmask.compare import compare_runs
from segmask.eval_config import EvalConfig
from segmask.evaluation import evaluate
from segmask.leaks import leak_check
from segmask.loading import load_model
from segmask.results import git_commit, machine, predictions_path
from segmask.segments import encode_instruction
from segmask.tasks.commonsense import load_task
from segmask.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
from demo import smollm2_gguf  # noqa: E402  (experiments/demo/demo.py)

TASKS = ("ARC-Easy", "ARC-Challenge", "openbookqa", "boolq", "social_i_qa")
POLICIES = ("causal", "mas")
MODELS = ("base", *POLICIES)
CONFIG = "configs/cpu_smollm2.yaml"
# the committed runs predate the sink default (issue 20): they train and score the paper's mask
CAUSAL_SINK = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--data-dir", default="../shared/data/commonsense")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument(
        "--max-steps", type=int, default=None, help="override the config's steps (reduced run)"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N test records per task (reduced run)")
    parser.add_argument("--scoring", default="loglik", choices=("loglik", "generate"))
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=MODELS,
        help="train/evaluate only these (e.g. evaluate base while the adapters train in other processes); "
        "the tables are written once all three are evaluated",
    )
    parser.add_argument(
        "--out", default="runs/commonsense_cpu", help="adapters and checkpoints (not committed)"
    )
    parser.add_argument("--results", default="results/commonsense_cpu", help="results to commit")
    return parser.parse_args(argv)


def reduced(args: argparse.Namespace) -> bool:
    return args.max_steps is not None or args.limit is not None


def train_configs(args: argparse.Namespace) -> dict:
    """One TrainConfig per policy from the YAML recipe; only ``mask`` and ``output`` differ."""

    configs = {}
    for policy in POLICIES:
        output = Path(args.out) / policy
        overrides = {
            "mask": policy,
            "causal_sink": CAUSAL_SINK,
            "output": str(output),
            "resume": output.exists(),
        }
        if args.max_steps is not None:
            base = TrainConfig.from_yaml(args.config)
            per_step = base.batch_size * base.gradient_accumulation_steps
            overrides |= {
                "max_steps": args.max_steps,
                "max_records": args.max_steps * per_step,
                "save_steps": min(base.save_steps, args.max_steps),
                "eval_steps": min(base.eval_steps, args.max_steps),
                "warmup_steps": min(base.warmup_steps, max(1, args.max_steps // 10)),
            }
        configs[policy] = TrainConfig.from_yaml(args.config, **overrides)
    return configs


def leak_checks(args: argparse.Namespace, folder: Path, policy: str) -> float:
    """The perturbation test on one fine-tuned model, one test record of every task."""
    model, tokenizer, _ = load_model(folder)
    records = [load_task(args.data_dir, task, 1).records[0] for task in args.tasks]
    return max(
        leak_check(
            model, encode_instruction(tokenizer, r, policy=policy, causal_sink=CAUSAL_SINK), max_cuts=3
        )
        for r in records
    )


def evaluate_model(
    args: argparse.Namespace, name: str, source: Path, policy: str, evals: Path, timings: dict
) -> None:
    """``segmask eval`` of one model, task by task; tasks with a results file are skipped."""
    todo = [task for task in args.tasks if not (evals / name / f"{task}.json").exists()]
    if not todo:
        return
    model, tokenizer, _ = load_model(source, policy=policy)
    for task in todo:
        started = time.perf_counter()
        config = EvalConfig(
            args.data_dir, task, policy=policy, scoring=args.scoring, limit=args.limit,
            out=evals / name / f"{task}.json", causal_sink=CAUSAL_SINK,
        )  # fmt: skip
        evaluate(model, tokenizer, config, model_name=name)
        timings[f"eval {name} {task}"] = round(time.perf_counter() - started, 1)
        print(f"[commonsense] eval {name} {task}: {timings[f'eval {name} {task}']:.0f} s", flush=True)


def training_record(folder: Path, results: Path, policy: str) -> dict:
    """Steps, final losses and the wall time of each ``train()`` call (a resumed run has several) of a run;
    its metrics and loss curve are copied to ``results`` as ``train_metrics_<policy>.jsonl`` and
    ``train_loss_<policy>.png``."""
    shutil.copyfile(folder / "metrics.jsonl", results / f"train_metrics_{policy}.jsonl")
    if (folder / "loss_curve.png").exists():
        shutil.copyfile(folder / "loss_curve.png", results / f"train_loss_{policy}.png")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [row for row in rows if "loss" in row]
    evals = [row for row in rows if "eval_loss" in row]
    return {
        "steps": max(row["step"] for row in rows),
        "train_runtime_s_per_call": [round(row["train_runtime"], 1) for row in rows if "train_loss" in row],
        "last_logged_loss": losses[-1]["loss"] if losses else None,
        "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_seen": max((row.get("num_input_tokens_seen", 0) for row in rows), default=0),
    }


def plot_training(folders: dict[str, Path], out: Path) -> Path:
    """Training loss (every logged step) and held-out loss (every eval) of each policy, one figure."""
    import matplotlib  # heavy, and only the tables need it; the backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for (policy, folder), color in zip(folders.items(), ("tab:blue", "tab:orange")):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        train = [(row["step"], row["loss"]) for row in rows if "loss" in row]
        held = [(row["step"], row["eval_loss"]) for row in rows if "eval_loss" in row]
        axis.plot(*zip(*train), color=color, alpha=0.6, label=f"{policy}: training loss")
        axis.plot(*zip(*held), "o-", color=color, label=f"{policy}: held-out loss (64 records)")
    axis.set(xlabel="optimiser step (16 records)", ylabel="loss (answer tokens)", yscale="log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def merge(evals: Path, name: str, tasks: list[str], out: Path) -> Path:
    """Per-task results of one model -> ``<out>/<name>.json`` and its predictions, for ``segmask compare``."""
    parts = [json.loads((evals / name / f"{task}.json").read_text()) for task in tasks]
    merged = {**parts[0], "tasks": {}, "average": None}
    lines = []
    for part in parts:
        merged["tasks"].update(part["tasks"])
        lines.append((evals / name / part["predictions"]).read_text())
    merged["average"] = sum(t["accuracy"] for t in merged["tasks"].values()) / len(merged["tasks"])
    file = out / f"{name}.json"
    merged["predictions"] = predictions_path(file).name
    predictions_path(file).write_text("".join(lines), encoding="utf-8")
    file.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    return file


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Path(args.results)
    evals = results / "evals"
    results.mkdir(parents=True, exist_ok=True)
    state_file = results / "state.json"
    state = (
        json.loads(state_file.read_text())
        if state_file.exists()
        else {"timings": {}, "leak_check": {}, "commands": []}
    )
    state["commands"].append(
        "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    )

    def save() -> None:
        """Merge into what other processes of this experiment wrote meanwhile, then replace atomically."""
        if state_file.exists():
            written = json.loads(state_file.read_text())
            for key in ("timings", "leak_check"):
                state[key] = {**written.get(key, {}), **state[key]}
            state["commands"] = list(dict.fromkeys([*written.get("commands", []), *state["commands"]]))
        tmp = state_file.with_name(state_file.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(state_file)

    configs = train_configs(args)
    for policy, config in configs.items():
        if policy not in args.models:
            continue
        if not (Path(config.output) / "segmask.json").exists():
            started = time.perf_counter()
            train(config)
            state["timings"][f"train {policy} (this session)"] = round(time.perf_counter() - started, 1)
            save()
        if policy not in state["leak_check"]:
            state["leak_check"][policy] = leak_checks(args, Path(config.output), policy)
            print(
                f"[commonsense] leak check {policy}: max change {state['leak_check'][policy]:.2g} (passed)",
                flush=True,
            )
            save()

    if all((Path(c.output) / "segmask.json").exists() for c in configs.values()):
        plot_training({p: Path(c.output) for p, c in configs.items()}, results / "train_loss.png")
    models = {"base": (smollm2_gguf(), "causal"), **{p: (Path(c.output), p) for p, c in configs.items()}}
    for name, (source, policy) in models.items():
        if name in args.models:
            evaluate_model(args, name, source, policy, evals, state["timings"])
            save()
    missing = [n for n in models for t in args.tasks if not (evals / n / f"{t}.json").exists()]
    if missing:
        print(f"[commonsense] not evaluated yet: {', '.join(sorted(set(missing)))}; tables come later")
        return 0

    files = [merge(evals, name, args.tasks, results) for name in models]
    table = compare_runs(files, results / "table.md", results / "accuracy.png")
    by_name = dict(zip(models, files))
    head_to_head = compare_runs([by_name["causal"], by_name["mas"]], results / "mas_vs_causal.md")
    label = "REDUCED run (not the full experiment)" if reduced(args) else "full run"
    state |= {
        "label": label,
        "train_config": {p: c.to_dict() for p, c in configs.items()},
        "train_runs": {p: training_record(Path(c.output), results, p) for p, c in configs.items()},
        "eval": {"tasks": args.tasks, "limit": args.limit, "scoring": args.scoring},
        "full_command": "python experiments/commonsense_cpu/run.py",
        "commit": git_commit(),
        "machine": machine(),
        "torch_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    save()
    print(f"{label}\n\n{table}\n{head_to_head}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
