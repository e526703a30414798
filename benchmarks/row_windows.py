"""A design the fast path does not use, kept as measured: masked row windows instead of reversed squares.

    python benchmarks/row_windows.py --threads 1
    python benchmarks/row_windows.py --threads 2

Under MAS a query of a document sees ONE contiguous key range, ``[doc_start, end(i))`` (``end(i)`` the end
of its segment, or ``i + 1`` for a causal token). So the rows can be cut into windows of ``W`` queries, each
one call of torch's CPU flash operator over the keys up to the window's largest ``end(i)`` with a
``[W, keys]`` additive mask (the operator takes one): no reversed squares, no gathers, no merges, every row
written once. Its cost over the exact pairs is about ``W / L`` of masked pairs, plus the mask.

This script checks the windows against ``mas_attention`` (exact to 1e-5) and times, in one run with the
implementations taking turns, the forward of: causal attention, the fast path as it is
(``mas_attention``), and the windows for ``W`` = 64 and 128; each divided by causal's time and by the pair
ratio (``/pairs``, 1.0 = causal's cost per allowed pair). One row of 8 heads, head dim 64, float32.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys  # noqa: E402  (benchmarks/ is not a package)
import time
from pathlib import Path

import torch

from segmask.fast_attention import mas_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import layout_ids  # noqa: E402

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def key_ends(segment_ids: torch.Tensor) -> torch.Tensor:
    """``end(i)`` of each position of one row (one document, no padding): its segment's end, or ``i + 1``."""
    ends = torch.arange(1, segment_ids.numel() + 1)
    ids = segment_ids.tolist()
    start = 0
    while start < len(ids):
        stop = start
        while stop < len(ids) and ids[stop] == ids[start]:
            stop += 1
        if ids[start] >= 0:
            ends[start:stop] = stop
        start = stop
    return ends


def windows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ends: torch.Tensor, size: int) -> torch.Tensor:
    """MAS attention of one row as masked windows of ``size`` queries."""
    length = q.shape[2]
    out = torch.empty_like(q)
    for start in range(0, length, size):
        stop = min(length, start + size)
        last = int(ends[start:stop].max())
        mask = torch.zeros(stop - start, last).masked_fill_(
            torch.arange(last) >= ends[start:stop, None], float("-inf")
        )
        out[:, :, start:stop] = FLASH(
            q[:, :, start:stop],
            k[:, :, :last],
            v[:, :, :last],
            0.0,
            False,
            attn_mask=mask,
            scale=q.shape[-1] ** -0.5,
        )[0]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; forward, /pairs")
    print(f"{'layout':8} {'L':>5} {'pairs':>6} {'fast path':>10} {'W=64':>7} {'W=128':>7}")
    for layout in ("prompt", "chat", "fewshot"):
        for length in args.lengths:
            ids = layout_ids(layout, length)
            ends = key_ends(ids[0])
            q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
            reference = mas_attention(q, k, v, ids)
            impls = {
                "causal": functools.partial(FLASH, q, k, v, 0.0, True, scale=0.125),
                "fast": functools.partial(mas_attention, q, k, v, ids),
                "W=64": functools.partial(windows, q, k, v, ends, 64),
                "W=128": functools.partial(windows, q, k, v, ends, 128),
            }
            for name in ("W=64", "W=128"):
                error = (impls[name]() - reference).abs().max().item()
                if error > 1e-5:
                    raise SystemExit(f"{layout} {length} {name}: differs from mas_attention by {error:.2g}")
            times: dict[str, list[float]] = {name: [] for name in impls}
            for _ in range(args.repeats):
                for name, fn in impls.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            median = {name: statistics.median(t) for name, t in times.items()}
            pairs = ends.sum().item() / (length * (length + 1) / 2)
            cells = [median[name] / median["causal"] / pairs for name in ("fast", "W=64", "W=128")]
            print(
                f"{layout:8} {length:5} {pairs:6.3f} "
                + " ".join(f"{c:>{w}.2f}" for c, w in zip(cells, (10, 7, 7)))
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
