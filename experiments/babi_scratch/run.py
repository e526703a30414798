"""From scratch on bAbI: does a small Llama trained from random init read better with MAS?

    python experiments/babi_scratch/run.py --tasks 1 --seeds 0 1 --epochs 10

Three conditions on the same data, initialisation, data order, steps and hyperparameters (per seed):

    causal   the usual causal mask over story, question and answer
    mas      the story and the question are two bidirectional segments (chat turns), answer causal
    prefix   the story and the question are one bidirectional segment, answer causal

Two layouts (``--layout``). ``question`` (default): one chat per question, the story so far and the question
as two user turns. ``story``: one multi-turn chat per story holding all its questions, each a round of
user turns (the statements since the previous question, the question) and the answer, so one sequence trains
every answer of the story (:func:`segmask.tasks.babi.story_messages`); a test question is prompted by its story up
to it, earlier questions with their gold answers. In the ``story`` layout ``prefix`` puts each round's
statements and question in one user turn (one segment per round: ``mas`` over the merged turns), since the
``prefix`` policy proper would make every earlier answer bidirectional.

A word-level tokenizer is built from the bAbI training files; for each seed one random ``LlamaForCausalLM``
is initialised and saved, and each condition trains a full copy of it with ``segmask.train`` (loss on the
answer and its end-of-turn token only). Before its numbers are reported each trained model passes
:func:`segmask.leaks.leak_check` on test stories. Test accuracy per task is the share of questions whose
answer has the highest log-probability among the task's answer vocabulary (the prompt prefilled under the
condition's mask). Results go to ``--results`` (per-run JSON + predictions, ``summary.json``,
``table.md``, ``accuracy.png``); re-running skips finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scratch import (  # noqa: E402
    CAUSAL_SINK,
    ModelSize,
    augmented,
    build_tokenizer,
    evaluate_stories,
    init_model,
    parameter_count,
    question_prompts,
    story_prompts,
)
from summarize import plot_losses, summarize  # noqa: E402

from segmask.leaks import leak_check  # noqa: E402
from segmask.segments import encode_chat  # noqa: E402
from segmask.tasks.babi import read_story_questions, read_task, story_messages  # noqa: E402
from segmask.tasks.reading import to_messages, write_jsonl  # noqa: E402

CONDITIONS = ("causal", "mas", "prefix")
LAYOUTS = ("question", "story")


def condition_setup(layout: str, condition: str) -> tuple[str, bool]:
    """The mask policy a condition trains and scores with, and whether its rounds merge into one user turn."""
    if layout == "story" and condition == "prefix":
        return "mas", True
    return condition, False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--babi-dir", default="../shared/data/babi/en-10k")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--policies", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument(
        "--layout", default="question", choices=LAYOUTS, help="one chat per question, or per story"
    )
    parser.add_argument(
        "--train-limit", type=int, default=None, help="training questions per task (default: all)"
    )
    parser.add_argument(
        "--test-limit", type=int, default=None, help="test questions per task (default: all 1000)"
    )
    parser.add_argument(
        "--augment",
        type=int,
        default=1,
        help="story layout: train on this many copies of each story, all but the first with people and "
        "places renamed by a random permutation (1: the stories as they are)",
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--lr-scheduler", default="cosine", help="a transformers scheduler name")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--out", default="runs/babi_scratch", help="models and checkpoints (not committed)")
    parser.add_argument("--results", default="results/babi_scratch", help="results to commit")
    return parser.parse_args(argv)


def run_name(policy: str, seed: int) -> str:
    return f"{policy}-seed{seed}"


def train_run(
    args: argparse.Namespace, base: Path, data: Path, policy: str, seed: int, output: Path
) -> float:
    """Train one condition (resuming an interrupted run); return the wall time spent now."""
    from segmask.training import TrainConfig, train

    started = time.perf_counter()
    config = TrainConfig(
        model=str(base),
        data=(str(data),),
        output=str(output),
        policy=policy,
        causal_sink=CAUSAL_SINK,
        cutoff_len=args.cutoff_len,
        epochs=args.epochs,
        batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        lora_r=0,
        attn_implementation="sdpa",
        precision="fp32",
        seed=seed,
        logging_steps=50,
        save_steps=500,
        save_total_limit=1,
        resume=output.exists(),
    )
    train(config)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.augment != 1 and args.layout != "story":
        raise SystemExit("--augment needs --layout story")
    out, results = Path(args.out), Path(args.results)
    (results / "runs").mkdir(parents=True, exist_ok=True)
    train_stories = {t: read_task(args.babi_dir, t, "train", args.train_limit) for t in args.tasks}
    texts = [
        f"{s.text} {s.question} {' '.join(s.choices)}" for stories in train_stories.values() for s in stories
    ]
    tokenizer = build_tokenizer(texts)
    data: dict[bool, Path] = {}  # merged rounds or not -> training file
    test_prompts: dict[bool, dict] = {}
    for merge in (False,) if args.layout == "question" else (False, True):
        if args.layout == "question":
            conversations = [to_messages(s) for stories in train_stories.values() for s in stories]
            test_prompts[merge] = {
                f"qa{t}": question_prompts(read_task(args.babi_dir, t, "test", args.test_limit))
                for t in args.tasks
            }
        else:
            conversations = [
                story_messages(questions, merge_turns=merge)
                for t in args.tasks
                for questions in augmented(
                    read_story_questions(args.babi_dir, t, "train", args.train_limit),
                    train_stories[t][0].choices,
                    args.augment,
                )
            ]
            test_prompts[merge] = {
                f"qa{t}": story_prompts(
                    read_story_questions(args.babi_dir, t, "test", args.test_limit),
                    train_stories[t][0].choices,
                    merge,
                )
                for t in args.tasks
            }
        suffix = "" if args.layout == "question" else "-story-merged" if merge else "-story"
        data[merge] = write_jsonl(conversations, out / f"train{suffix}.jsonl")
    size = ModelSize(args.hidden, args.layers, args.heads)
    log = results / "log.jsonl"

    for seed in args.seeds:
        base = out / f"init-seed{seed}"
        if not (base / "config.json").exists():
            init_model(tokenizer, size, seed, base)
        for policy in args.policies:
            name = run_name(policy, seed)
            run_dir, run_file = out / name, results / "runs" / f"{name}.json"
            if run_file.exists():
                print(f"[babi] {name}: done, skipping", flush=True)
                continue
            mask, merge = condition_setup(args.layout, policy)
            seconds = (
                train_run(args, base, data[merge], mask, seed, run_dir)
                if not (run_dir / "segmask.json").exists()
                else 0.0
            )
            evaluate(args, run_dir, policy, mask, seed, test_prompts[merge], run_file, log, seconds)

    summary = summarize(results, args.tasks, args.seeds, args.policies)
    names = [run_name(p, s) for p in args.policies for s in args.seeds]
    plot_losses({name: curve_file(results, out, name) for name in names}, results / "loss.png")
    log_rows = (
        [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    )
    summary["runs"] = {row["run"]: row for row in log_rows if row["run"] in names}
    summary["setup"] = {
        "command": "python " + " ".join(sys.argv),
        "parameters": parameter_count(out / f"init-seed{args.seeds[0]}"),
        "vocab": len(tokenizer),
        "train_questions": {f"qa{t}": len(s) for t, s in train_stories.items()},
        "test_questions": {name: len(s) for name, s in test_prompts[False].items()},
        "args": vars(args),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


def evaluate(
    args,
    run_dir: Path,
    policy: str,
    mask: str,
    seed: int,
    prompts: dict,
    run_file: Path,
    log: Path,
    seconds: float,
) -> None:
    """Leak-check a trained run (condition ``policy``, trained with ``mask``) on three test prompts with
    their answers, then score it on every test task."""
    from segmask.loading import load_model

    started = time.perf_counter()
    model, tokenizer, _ = load_model(run_dir)
    probes = random.Random(seed).sample([p for task in prompts.values() for p in task], 3)
    leak = max(
        leak_check(
            model,
            encode_chat(
                tokenizer,
                [*messages, {"role": "assistant", "content": s.answer}],
                policy=mask,
                causal_sink=CAUSAL_SINK,
            ),
        )
        for messages, s in probes
    )
    name = run_name(policy, seed)
    result = evaluate_stories(
        model, tokenizer, prompts, mask, run_file, model_name=name, layout=args.layout, condition=policy
    )
    entry = {
        "run": name,
        "policy": policy,
        "mask": mask,
        "layout": args.layout,
        "seed": seed,
        "leak_check_max_change": leak,
        "train_wall_s": round(seconds, 1),
        "eval_wall_s": round(time.perf_counter() - started, 1),
        "train_steps": _train_steps(run_dir),
        "accuracy": {task: score["accuracy"] for task, score in result["tasks"].items()},
    }
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    # the loss curve, kept with the results (run folders are not committed)
    if (run_dir / "metrics.jsonl").exists():
        shutil.copyfile(run_dir / "metrics.jsonl", run_file.with_suffix(".metrics.jsonl"))
    print(f"[babi] {name}: leak check max change {leak:.2g}; accuracy {entry['accuracy']}", flush=True)


def curve_file(results: Path, out: Path, name: str) -> Path:
    """A run's training curve: the copy committed with its results, else the one in its (uncommitted) run folder."""
    kept = results / "runs" / f"{name}.metrics.jsonl"
    return kept if kept.exists() else out / name / "metrics.jsonl"


def _train_steps(run_dir: Path) -> int | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return max((row["step"] for row in rows), default=None)


if __name__ == "__main__":
    sys.exit(main())
