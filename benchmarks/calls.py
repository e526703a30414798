"""Where the fast path's time goes: each kernel call of one MAS attention step, timed, against causal SDPA.

    python benchmarks/calls.py --threads 1 --lengths 2048 --layouts chat fewshot
    python benchmarks/calls.py --threads 1 --lengths 4096 --passes fwd --rounds 9
    python benchmarks/calls.py --threads 2 --clock wall --lengths 2048 --passes fwd    # idle machine only

The fast path (``segmask.fast_attention.layout_attention``, as ``benchmarks/attention.py`` times it) runs a
plan of kernel calls: causal blocks on the diagonal, full (unmasked) blocks over earlier keys, and masked
band tiles where a segment crosses a tile's end. Here its kernel is the device's default wrapped so that
each call's process CPU time is recorded with its shape; ``--rounds`` rounds alternate the fast path with
causal SDPA (rotating order), and per call the median over the rounds is kept. Reported per kind of call:
count, ms per step, ns per computed query-key pair (per head and per batch entry, a band call's tiles
being its batch entries; a causal call computes ``Q (Q + 1) / 2`` pairs, the others ``Q K``), and the
step's time outside the kernel (merges, copies, masks: the step's time less its calls'), beside causal
SDPA's whole step and its ns per allowed pair (``L (L + 1) / 2``). By default CPU time, not wall clock, so
that a shared machine's preemption does not count (cache effects of other processes still do); CPU time
sums the threads, so with several threads on an idle machine ``--clock wall`` shows where the step's
wall time goes (threads waiting at a call's end included).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from collections import defaultdict

import rounds  # benchmarks/rounds.py, next to this script
import torch
import torch.nn.functional as F
from attention import LAYOUTS, layout_ids, pair_ratio  # benchmarks/attention.py, next to this script

from segmask import kernels
from segmask.attention_plan import Layout
from segmask.fast_attention import layout_attention


class Recorder:
    """The default kernel, each call's CPU time and shape recorded in ``calls`` (cleared per step)."""

    def __init__(self, device: torch.device, clock=time.process_time) -> None:
        base = kernels.select(device)
        self.calls: list[tuple[str, str, int, int, int, float]] = []

        def forward(q, k, v, causal, scale, mask=None):
            start = clock()
            result = base.forward(q, k, v, causal, scale, mask)
            self.record("fwd", causal, mask, q, k, clock() - start)
            return result

        def backward(grad_out, q, k, v, out, lse, causal, scale, mask=None):
            start = clock()
            result = base.backward(grad_out, q, k, v, out, lse, causal, scale, mask)
            self.record("bwd", causal, mask, q, k, clock() - start)
            return result

        self.kernel = dataclasses.replace(base, forward=forward, backward=backward)

    def record(
        self, direction: str, causal: bool, mask, q: torch.Tensor, k: torch.Tensor, seconds: float
    ) -> None:
        kind = "causal" if causal else ("band" if mask is not None else "full")
        # a call's batch dimension is the batch's rows, or for a band call its tiles: count them all
        self.calls.append((direction, kind, q.shape[0] * q.shape[1], q.shape[2], k.shape[2], seconds))


def computed_pairs(kind: str, heads: int, q_rows: int, keys: int) -> int:
    """Query-key pairs a call computes over its ``heads`` (batch entries x heads: a band call's tiles are its
    batch entries)."""
    return heads * (q_rows * (q_rows + 1) // 2 if kind == "causal" else q_rows * keys)


def measure(args: argparse.Namespace, layout: str, seq_len: int, backward: bool) -> dict:
    segment_ids = layout_ids(layout, seq_len, args.batch)
    plan = Layout(segment_ids)
    wall = args.clock == "wall"
    recorder = Recorder(torch.device("cpu"), time.perf_counter if wall else time.process_time)
    torch.manual_seed(0)
    shape = (args.batch, args.heads, seq_len, args.head_dim)
    inputs = [torch.randn(shape, requires_grad=backward) for _ in range(3)]

    def step(fn) -> None:
        if backward:
            out = fn(*inputs)
            out.backward(torch.ones_like(out))
            for t in inputs:
                t.grad = None
        else:
            with torch.no_grad():
                fn(*inputs)

    per_round: list[list[tuple]] = []

    def fast() -> None:
        recorder.calls = []
        step(lambda q, k, v: layout_attention(q, k, v, plan, kernel=recorder.kernel))
        per_round.append(recorder.calls)

    def causal() -> None:
        step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))

    times = rounds.interleaved({"causal-sdpa": causal, "mas-fast": fast}, args.rounds)
    timed = per_round[1:]  # the warm-up round's calls left out
    if len({tuple(c[:5] for c in calls) for calls in timed}) != 1:
        raise SystemExit("the fast path's calls differ between rounds: per-call medians would mix them")
    calls = [
        (*shape_, statistics.median(r[i][5] for r in timed))
        for i, shape_ in enumerate(c[:5] for c in timed[0])
    ]
    kinds: dict[tuple[str, str], dict] = defaultdict(lambda: {"count": 0, "seconds": 0.0, "pairs": 0})
    for direction, kind, heads, q_rows, keys, seconds in calls:
        entry = kinds[(direction, kind)]
        entry["count"] += 1
        entry["seconds"] += seconds
        entry["pairs"] += computed_pairs(kind, heads, q_rows, keys)
    step_s = statistics.median(times["mas-fast"].wall if wall else times["mas-fast"].cpu)
    causal_s = statistics.median(times["causal-sdpa"].wall if wall else times["causal-sdpa"].cpu)
    causal_pairs = args.batch * args.heads * seq_len * (seq_len + 1) // 2
    return {
        "layout": layout,
        "seq_len": seq_len,
        "pass": "fwd+bwd" if backward else "fwd",
        "clock": args.clock,
        "pair_ratio": round(pair_ratio(segment_ids), 4),
        "causal_ms": round(causal_s * 1000, 2),
        "causal_ns_per_pair": round(causal_s * 1e9 / causal_pairs, 3),  # the whole pass, fwd and bwd together
        "fast_ms": round(step_s * 1000, 2),
        "kernel_ms": round(sum(c[5] for c in calls) * 1000, 2),
        "outside_kernel_ms": round((step_s - sum(c[5] for c in calls)) * 1000, 2),
        "kinds": [
            {
                "direction": direction,
                "kind": kind,
                "count": e["count"],
                "ms": round(e["seconds"] * 1000, 2),
                "ns_per_pair": round(e["seconds"] * 1e9 / e["pairs"], 3),
            }
            for (direction, kind), e in sorted(kinds.items())
        ],
        "calls": [
            {"direction": d, "kind": k, "heads": h, "q_rows": q, "keys": n, "us": round(s * 1e6, 1)}
            for d, k, h, q, n, s in calls
        ],
    }


def print_cell(r: dict) -> None:
    print(
        f"{r['layout']} L={r['seq_len']} {r['pass']}: causal SDPA {r['causal_ms']:.1f} ms {r['clock']}; fast path "
        f"{r['fast_ms']:.1f} ms ({r['fast_ms'] / r['causal_ms']:.3f} x causal, pair ratio "
        f"{r['pair_ratio']:.2f}) = kernel calls {r['kernel_ms']:.1f} ms + outside the kernel "
        f"{r['outside_kernel_ms']:.1f} ms"
    )
    for k in r["kinds"]:
        print(
            f"    {k['direction']} {k['kind']:6} {k['count']:>4} calls {k['ms']:>9.2f} ms {k['ns_per_pair']:>8.3f} ns/pair"
        )
    print(f"    causal SDPA, the whole pass: {r['causal_ns_per_pair']:.3f} ns per allowed pair")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["chat", "fewshot"])
    parser.add_argument("--passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="time calls and steps by the process's CPU time (default; preemption on a shared machine does "
        "not count, but with several threads it sums them) or by wall clock (for several threads, idle "
        "machine)",
    )
    parser.add_argument(
        "--json", metavar="FILE", help='write {"machine", "command", "records"} with every call'
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        print("--rounds must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    info = rounds.machine(torch.get_num_threads())
    print(rounds.describe(info))
    print(
        f"batch {args.batch}, {args.heads} heads, head dim {args.head_dim}, float32, "
        f"{'wall clock' if args.clock == 'wall' else 'CPU time'}, "
        f"per-call medians over {args.rounds} rounds"
    )
    records = []
    for layout in args.layouts:
        for seq_len in args.lengths:
            for backward in (p == "fwd+bwd" for p in args.passes):
                records.append(measure(args, layout, seq_len, backward))
                print_cell(records[-1])
    print(rounds.finish(info))
    rounds.write_json(args.json, info, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
