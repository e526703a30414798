"""One attention call under MAS: what does it cost next to causal attention?

    python benchmarks/attention.py --quick                       # 512-2048 tokens, 15 rounds per cell
    python benchmarks/attention.py --json benchmarks/attention.json
    python benchmarks/attention.py --check --lengths 1024        # exactness of mas-fast against the dense mask
    benchmarks/gpu.sh                                            # the same on CUDA, bf16, 2k-16k tokens

For each sequence length and segment layout, forward ("fwd") and forward + backward ("fwd+bwd") of
    causal-sdpa   scaled_dot_product_attention(is_causal=True): the floor MAS is compared to
    mas-dense     SDPA with the dense [B, 1, L, L] MAS mask (segmask.masks.sdpa_mask)
    mas-fast      segmask.fast_attention.mas_attention (no L x L mask), over one Layout per length
                  (layout_attention), whose plan every step reuses as a model's layers do
    mas-flex      FlexAttention with segmask.masks.block_mask (compiled; forward only where backward fails)
Each cell is timed in interleaved rounds (benchmarks/rounds.py): every round runs each implementation once,
in an order that rotates from round to round, so that drift and load from other processes hit all of them
alike. ``x causal`` is the median over the rounds of each round's ratio to causal-sdpa, with its spread
(``IQR``, ``min-max``); ``ms`` and ``cpu ms`` are the medians of wall-clock and process CPU time. With
``--sweeps N`` the whole grid is timed N times over (fresh inputs and plans each time) and each cell's
rounds are pooled, so that its median spans the run: on this project's 2-core VM, idle, the ratio of one
cell moved from 1.06 to 1.12 within five minutes, which rounds taken together cannot cancel. The head
names the CPU model, threads and the load average; the end, the load average again. ``--json`` keeps the
per-round ratios. Peak memory is that of tensors during one step: q, k, v and the mask plus the largest
total of tensors allocated and not yet freed (torch profiler memory events: outputs, temporaries, saved
tensors, gradients). Masks (and the fast path's plan, on its first call) are built once per layout and
length, outside the timed steps, as a model builds them once per forward for all its layers.
``pair_ratio`` is the number of allowed query-key pairs over causal's, so ``/pairs`` (``x causal /
pair_ratio``) is the cost per pair of work relative to causal; ``calls`` counts the fast path's kernel
calls per forward (the same in the backward).

Layouts (``--batch`` > 1: prompt rows repeat, chat and few-shot rows differ):
    prompt    10% system segment, 60% user segment, 30% causal answer
    chat      a 32-token system segment, then user segments and causal answers of 16-128 tokens
    fewshot   many short segments: examples of 8-32 tokens, each followed by a 1-8 token causal answer
On CUDA (``--device cuda``) times are wall clock after a synchronize and the peak is
``torch.cuda.max_memory_allocated``; ``--kernel`` names the fast path's kernel (see segmask.kernels).
"""

from __future__ import annotations

import argparse
import random
import statistics
import warnings
from collections.abc import Callable

import rounds  # benchmarks/rounds.py, next to this script
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from torch.profiler import ProfilerActivity, profile

from segmask import kernels, masks
from segmask.attention_plan import Layout
from segmask.fast_attention import layout_attention, mas_attention
from segmask.row_plan import BAND, PIECE

IMPLS = ("causal-sdpa", "mas-dense", "mas-fast", "mas-flex")
LAYOUTS = ("prompt", "chat", "fewshot")


def prompt_layout(seq_len: int) -> torch.Tensor:
    """10% system segment, 60% user segment, 30% causal answer: ``[1, L]`` segment ids."""
    system, user = seq_len // 10, seq_len * 6 // 10
    ids = torch.full((1, seq_len), -1, dtype=torch.long)
    ids[0, :system] = 0
    ids[0, system : system + user] = 1
    return ids


def chat_layout(seq_len: int, seed: int = 0) -> torch.Tensor:
    """A multi-turn chat: a short system segment, then user segments and causal answers of 16-128 tokens."""
    rng = random.Random(seed)
    ids = torch.full((1, seq_len), -1, dtype=torch.long)
    position, segment = min(32, seq_len), 1
    ids[0, :position] = 0
    while position < seq_len:
        user, answer = rng.randint(16, 128), rng.randint(16, 128)
        ids[0, position : position + user] = segment
        position += user + answer
        segment += 1
    return ids


def fewshot_layout(seq_len: int, seed: int = 0) -> torch.Tensor:
    """Few-shot examples: segments of 8-32 tokens, each followed by a causal answer of 1-8 tokens."""
    rng = random.Random(seed)
    ids = torch.full((1, seq_len), -1, dtype=torch.long)
    position, segment = 0, 0
    while position < seq_len:
        length = rng.randint(8, 32)
        ids[0, position : position + length] = segment
        position += length + rng.randint(1, 8)
        segment += 1
    return ids


def layout_ids(layout: str, seq_len: int, batch: int = 1) -> torch.Tensor:
    """``[batch, L]`` segment ids of ``layout``: prompt rows repeat, chat and few-shot rows differ (seeds)."""
    if layout == "prompt":
        return prompt_layout(seq_len).expand(batch, -1).clone()
    make = {"chat": chat_layout, "fewshot": fewshot_layout}[layout]
    return torch.cat([make(seq_len, seed) for seed in range(batch)])


def pair_ratio(segment_ids: torch.Tensor) -> float:
    """Allowed query-key pairs under MAS over those of causal attention (from the plan: no L x L mask)."""
    batch, seq_len = segment_ids.shape
    pairs = 0
    for first, last, plan in Layout(segment_ids).plan(seq_len, PIECE):
        for b in plan.blocks:
            n = b.q_end - b.q_start
            pairs += (last - first) * (n * (n + 1) // 2 if b.causal else n * (b.k_end - b.k_start))
        for upper in plan.uppers:
            pairs += (last - first) * sum((e - s) * (e - s - 1) // 2 for s, e in upper.segments)
    return pairs / (batch * seq_len * (seq_len + 1) / 2)


def fast_calls(segment_ids: torch.Tensor, kernel: str | None = None) -> int:
    """Kernel calls of the fast path per forward (and per backward) for these ids: band tiles for a kernel
    that takes a mask, reversed squares for one that does not."""
    try:
        masked = kernels.select(segment_ids.device, kernel).masked
    except kernels.KernelUnavailable:  # no fast kernel here: mas-fast runs the dense route (and says so)
        masked = False
    return Layout(segment_ids).calls(segment_ids.shape[1], PIECE, BAND if masked else 0).count()


def implementations(segment_ids: torch.Tensor, kernel: str | None = None) -> dict[str, tuple[Callable, int]]:
    """Each implementation as ``(f(q, k, v) -> out, bytes of its mask)``, masks on the ids' device.

    Masks are built once here, as a model builds them once per forward for all its layers (the fast path's
    plan likewise, on its first call); their memory counts towards each step's peak.
    """
    dense_mask = masks.sdpa_mask(segment_ids)
    layout = Layout(segment_ids)  # the fast path's plan, computed on its first call, then kept
    flex_mask = masks.block_mask(segment_ids)
    flex_bytes = sum(
        t.numel() * t.element_size() for t in flex_mask.as_tuple() if isinstance(t, torch.Tensor)
    )
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    return {
        "causal-sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 0),
        "mas-dense": (
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask),
            dense_mask.numel() * dense_mask.element_size(),
        ),
        "mas-fast": (lambda q, k, v: layout_attention(q, k, v, layout, kernel=kernel), 0),
        "mas-flex": (lambda q, k, v: compiled_flex(q, k, v, block_mask=flex_mask), flex_bytes),
    }


def step(fn: Callable, inputs: tuple[torch.Tensor, ...], backward: bool) -> None:
    if not backward:
        with torch.no_grad():
            fn(*inputs)
    else:
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        for t in inputs:
            t.grad = None
    if inputs[0].is_cuda:
        torch.cuda.synchronize()


def fns_steps(
    fns: dict[str, Callable], inputs: tuple[torch.Tensor, ...], backward: bool
) -> dict[str, Callable]:
    """Each implementation as a no-argument step, for :func:`rounds.interleaved`."""
    return {name: (lambda fn=fn: step(fn, inputs, backward)) for name, fn in fns.items()}


def peak_mib(fn: Callable, inputs: tuple[torch.Tensor, ...], backward: bool, mask_bytes: int) -> float:
    """Peak tensor memory of one step: inputs and mask plus the largest total of tensors allocated and not
    yet freed during the step (outputs, temporaries, saved tensors, gradients), from profiler memory events
    (on CUDA: ``max_memory_allocated``, which holds the inputs and the mask already)."""
    if inputs[0].is_cuda:
        torch.cuda.reset_peak_memory_stats()
        step(fn, inputs, backward)
        return torch.cuda.max_memory_allocated() / 2**20
    peak = step_peak_bytes(lambda: step(fn, inputs, backward))
    return (peak + mask_bytes + sum(t.numel() * t.element_size() for t in inputs)) / 2**20


def step_peak_bytes(run: Callable[[], object]) -> int:
    """The largest total of CPU tensor bytes allocated during ``run()`` and not yet freed at some moment of
    it, from torch profiler memory events (tensors alive before it do not count)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def check(args: argparse.Namespace, layout: str, seq_len: int) -> bool:
    """mas-fast against SDPA with the dense mask, output and gradients, both in ``args.dtype`` and against a
    float32 dense reference: exact up to the dense route's own rounding. Prints one line; True if it passes."""
    segment_ids = layout_ids(layout, seq_len, args.batch)
    mask = masks.sdpa_mask(segment_ids.to(args.device))
    generator = torch.Generator(device=args.device).manual_seed(0)
    shape = (args.batch, args.heads, seq_len, args.head_dim)
    q, k, v, grad = (torch.randn(shape, generator=generator, device=args.device) for _ in range(4))

    def run(fn, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]  # fresh leaves each run
        out = fn(*inputs)
        out.backward(grad.to(dtype))
        return [t.float() for t in (out, *(i.grad for i in inputs))]

    exact = run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), torch.float32)
    dense = run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), args.dtype)
    fast = run(lambda *t: mas_attention(*t, segment_ids.to(args.device), kernel=args.kernel), args.dtype)
    fast_error = max((a - b).abs().max().item() for a, b in zip(fast, exact))
    dense_error = max((a - b).abs().max().item() for a, b in zip(dense, exact))
    tolerance = 1e-4 if args.dtype == torch.float32 else 2 * dense_error + 1e-3
    ok = fast_error <= tolerance and all(not t.isnan().any() for t in fast)
    print(
        f"  check {layout} L={seq_len}: mas-fast max error {fast_error:.2e}, mas-dense {dense_error:.2e} "
        f"(against float32 dense; tolerance {tolerance:.2e}): {'ok' if ok else 'FAILED'}",
        flush=True,
    )
    return ok


def time_cell(args: argparse.Namespace, layout: str, seq_len: int, backward: bool, memory: bool) -> dict:
    """One sweep of one cell: fresh inputs and plans, a warm-up step each, ``args.repeats`` interleaved
    rounds; with ``memory`` also each implementation's peak. Returns the cell's description, its
    :class:`rounds.Times` per implementation and the peaks (empty without ``memory``)."""
    segment_ids = layout_ids(layout, seq_len, args.batch)
    ratio, calls = pair_ratio(segment_ids), fast_calls(segment_ids.to(args.device), args.kernel)
    torch.manual_seed(0)
    shape = (args.batch, args.heads, seq_len, args.head_dim)
    inputs = tuple(
        torch.randn(shape, dtype=args.dtype, device=args.device, requires_grad=backward) for _ in range(3)
    )
    built = {
        name: impl
        for name, impl in implementations(segment_ids.to(args.device), args.kernel).items()
        if name in args.impls
    }
    fns = {name: fn for name, (fn, _) in built.items()}
    # warm up (compiles flex) and drop what cannot run
    for name in list(fns):
        try:
            step(fns[name], inputs, backward)
        except Exception as error:  # noqa: BLE001 - report and skip, e.g. flex backward on CPU
            print(
                f"  {name} {layout} L={seq_len} {'fwd+bwd' if backward else 'fwd'}: skipped ({type(error).__name__})"
            )
            del fns[name]
    times = rounds.interleaved(fns_steps(fns, inputs, backward), args.repeats, warmup=0)
    peaks = {name: peak_mib(fns[name], inputs, backward, built[name][1]) for name in fns} if memory else {}
    cell = {"layout": layout, "seq_len": seq_len, "pass": "fwd+bwd" if backward else "fwd"}
    return {"cell": cell, "pair_ratio": ratio, "calls": calls, "times": times, "peaks": peaks}


def pool(sweeps: list[dict]) -> dict:
    """One cell's sweeps as one: the rounds of every sweep, in order; the implementations all sweeps ran."""
    names = [n for n in sweeps[0]["times"] if all(n in s["times"] for s in sweeps)]
    times = {
        n: rounds.Times(
            [x for s in sweeps for x in s["times"][n].wall], [x for s in sweeps for x in s["times"][n].cpu]
        )
        for n in names
    }
    return {**sweeps[0], "times": times}


def cell_records(args: argparse.Namespace, timed: dict) -> list[dict]:
    """The records of one cell (pooled over its sweeps): per implementation the median of the per-round
    ratios to causal with their spread, the median times, the peak memory."""
    cell, ratio, times, peaks = timed["cell"], timed["pair_ratio"], timed["times"], timed["peaks"]
    wall = {name: t.wall for name, t in times.items()}
    cpu = {name: t.cpu for name, t in times.items()}
    base = "causal-sdpa" if "causal-sdpa" in times else None
    wall_ratios = rounds.ratios(wall, base) if base else {}
    cpu_ratios = rounds.ratios(cpu, base) if base else {}
    records = []
    for name in times:
        spread = rounds.Spread.of(wall_ratios[name]) if base else None
        records.append(
            {
                "impl": name,
                **cell,
                "batch": args.batch,
                "rounds": len(wall[name]),
                "sweeps": getattr(args, "sweeps", 1),
                "ms": round(statistics.median(wall[name]) * 1000, 3),
                "cpu_ms": round(statistics.median(cpu[name]) * 1000, 3),
                "peak_mib": round(peaks[name], 2),
                # the median of the per-round ratios (rounds.py), with its spread over the rounds
                "ratio_to_causal": round(spread.median, 4) if spread else None,
                "ratio_spread": spread.as_dict() if spread else None,
                "per_pair_spread": spread.scaled(1 / ratio).as_dict() if spread else None,
                "cpu_ratio_to_causal": round(statistics.median(cpu_ratios[name]), 4) if base else None,
                "cpu_ratio_spread": rounds.Spread.of(cpu_ratios[name]).as_dict() if base else None,
                "round_ratios": [round(x, 4) for x in wall_ratios[name]] if base else None,
                "round_cpu_ratios": [round(x, 4) for x in cpu_ratios[name]] if base else None,
                "pair_ratio": round(ratio, 4),
                "calls": timed["calls"] if name == "mas-fast" else None,
            }
        )
    return records


def measure(args: argparse.Namespace, layout: str, seq_len: int, backward: bool) -> list[dict]:
    """One cell, one sweep, with peak memory: its records (``benchmarks/gpu/speed.py`` times cells so)."""
    return cell_records(args, time_cell(args, layout, seq_len, backward, memory=True))


def measure_grid(args: argparse.Namespace) -> list[dict]:
    """Every cell, ``args.sweeps`` times over: each sweep times every cell (``args.repeats`` rounds) before
    the next sweep begins, so that a cell's rounds sample the whole run, not one stretch of it (a host's
    state can change over minutes: its ratios with it). Peak memory in the first sweep."""
    cells = [
        (layout, seq_len, p == "fwd+bwd")
        for layout in args.layouts
        for seq_len in args.lengths
        for p in args.passes
    ]
    sweeps: dict[tuple, list[dict]] = {cell: [] for cell in cells}
    for sweep in range(args.sweeps):
        for layout, seq_len, backward in cells:
            timed = time_cell(args, layout, seq_len, backward, memory=sweep == 0)
            sweeps[(layout, seq_len, backward)].append(timed)
            for name, t in timed["times"].items():  # progress
                print(
                    f"  sweep {sweep + 1}/{args.sweeps} {layout} L={seq_len} {timed['cell']['pass']:7} {name:12} "
                    f"{statistics.median(t.wall) * 1000:9.1f} ms",
                    flush=True,
                )
    return [record for cell in cells for record in cell_records(args, pool(sweeps[cell]))]


def print_table(records: list[dict]) -> None:
    """One row per cell and implementation: ``x causal`` is the median of the per-round ratios, ``IQR`` and
    ``min-max`` their spread; ``/pairs`` the same divided by the pair ratio (cost per allowed pair)."""
    header = (
        f"{'layout':7} {'L':>5} {'pass':8} {'impl':12} {'ms':>9} {'x causal':>8} {'IQR':>11} {'min-max':>11} "
        f"{'pairs':>6} {'/pairs':>7} {'/pairs IQR':>11} {'cpu ms':>9} {'cpu x':>6} {'peak MiB':>9} {'calls':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in records:
        spread, per_pair, cpu_ratio = r["ratio_spread"], r.get("per_pair_spread"), r["cpu_ratio_to_causal"]
        cells = ["", "", "", "", ""]
        if spread:
            cells = [
                f"{spread['median']:.3f}",
                "{:.3f}-{:.3f}".format(*spread["iqr"]),
                "{:.2f}-{:.2f}".format(*spread["range"]),
                f"{per_pair['median']:.3f}",
                "{:.3f}-{:.3f}".format(*per_pair["iqr"]),
            ]
        print(
            f"{r['layout']:7} {r['seq_len']:>5} {r['pass']:8} {r['impl']:12} {r['ms']:>9.1f} {cells[0]:>8} "
            f"{cells[1]:>11} {cells[2]:>11} {r['pair_ratio']:>6.2f} {cells[3]:>7} {cells[4]:>11} "
            f"{r['cpu_ms']:>9.1f} {'' if cpu_ratio is None else f'{cpu_ratio:.2f}':>6} {r['peak_mib']:>9.1f} "
            f"{'' if r['calls'] is None else r['calls']:>5}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--kernel",
        default=None,
        help="the fast path's kernel (segmask.kernels; default: the device's default)",
    )
    parser.add_argument(
        "--check", action="store_true", help="check mas-fast against the dense mask first; exit 1 if it fails"
    )
    parser.add_argument("--check-only", action="store_true", help="only the check, no timing")
    parser.add_argument(
        "--rounds",
        "--repeats",
        dest="repeats",
        type=int,
        default=15,
        help="timed rounds per cell, each running every implementation once (default 15)",
    )
    parser.add_argument(
        "--sweeps",
        type=int,
        default=1,
        help="time the whole grid this many times over, --rounds rounds per cell each time, and pool each "
        "cell's rounds (a cell's median then spans the run, not one stretch of it)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="512-2048 tokens")
    parser.add_argument(
        "--json", metavar="FILE", help='write {"machine", "command", "records"} (with the per-round ratios)'
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.sweeps < 1:
        parser.exit(2, "--rounds and --sweeps must be >= 1\n")
    if args.quick:
        args.lengths = [512, 1024, 2048]
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch._dynamo.config.cache_size_limit = 64

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    info = rounds.machine(torch.get_num_threads(), args.device)
    print(rounds.describe(info))
    print(
        f"batch {args.batch}, {args.heads} heads, head dim {args.head_dim}, {args.dtype}, {args.device}, "
        f"fast kernel {args.kernel or 'default'}, median of the per-round ratios over {args.repeats} rounds"
        + (f" in each of {args.sweeps} sweeps of the grid" if args.sweeps > 1 else "")
    )
    if args.check or args.check_only:
        results = [check(args, layout, seq_len) for layout in args.layouts for seq_len in args.lengths]
        if not all(results):
            print("mas-fast does not match the dense mask: not timing it")
            return 1
        if args.check_only:
            return 0
    records = measure_grid(args)
    print_table(records)
    print(rounds.finish(info))
    rounds.write_json(args.json, info, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
