"""Two designs measured before the fast path took band tiles: masked row windows (not used), and the
diagonal-band prototype that the fast path's band tiles (:class:`segmask.row_plan.Band`) grew from.
The fast path's tiles differ: a band as wide as its tile (a segment crossing the tile's end gets a small
full block), tiles grouped so that the keys before a group are one long call, the mask picked row by row
from a table anew for each call. The "fast path" column is ``mas_attention`` as it now is.

    python benchmarks/row_windows.py --threads 1
    python benchmarks/row_windows.py --threads 2

Under MAS a query of a document sees ONE contiguous key range, ``[doc_start, end(i))`` (``end(i)`` the end
of its segment, or ``i + 1`` for a causal token). So the rows can be cut into windows of ``W`` queries, each
one call of torch's CPU flash operator over the keys up to the window's largest ``end(i)`` with a
``[W, keys]`` additive mask (the operator takes one): no reversed squares, no gathers, no merges, every row
written once. Its cost over the exact pairs is about ``W / L`` of masked pairs, plus the mask.

The band ("band 256"): blocks of 256 queries, each an unmasked call over the keys before it, plus ONE call
for every block's diagonal band (its own keys and the few after it that its segments reach, the same width
for every block, read as strided views of k and v without a copy) with a ``[blocks, 1, 256, width]``
additive mask, merged through the log-sum-exps. Its work is the causal call's (the kernel too computes
whole diagonal tiles and masks them), the later tokens of short segments included, so it needs no
reversed squares; the price is the mask, built once per forward for all layers (counted in no time here).

This script checks each design against ``mas_attention`` (exact to 1e-5) and times, in one run with the
implementations taking turns, the forward of: causal attention, the fast path as it is
(``mas_attention``), the windows for ``W`` = 64 and 128, and the band; each divided by causal's time and by
the pair ratio (``/pairs``, 1.0 = causal's cost per allowed pair). One row of 8 heads, head dim 64, float32.
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


def band_mask(ends: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """The diagonal band's additive mask ``[blocks, 1, size, size + over]`` and ``over``, how far past its
    block the furthest segment of a block reaches (the band's width beyond ``size``); length a multiple of
    ``size``."""
    length = ends.numel()
    blocks = length // size
    over = max(0, max(int(ends[b * size : (b + 1) * size].max()) - (b + 1) * size for b in range(blocks)))
    keys = torch.arange(size + over)
    mask = torch.zeros(blocks, 1, size, size + over)
    for b in range(blocks):
        start = b * size
        hidden = (start + keys >= ends[start : start + size, None]) | (start + keys >= length)
        mask[b, 0].masked_fill_(hidden, float("-inf"))
    return mask, over


def band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, over: int) -> torch.Tensor:
    """MAS attention of one row (``[1, H, L, D]``, contiguous) as unmasked blocks below the diagonal and one
    masked call for the diagonal band of every block (the blocks whose band would pass the row's end
    separately, over the keys that remain)."""
    _, heads, length, dim = q.shape
    blocks, _, size, width = mask.shape
    scale = dim**-0.5
    out = torch.empty_like(q)
    lse = q.new_empty(1, heads, length)
    inside = max(0, min(blocks, (length - width) // size + 1))  # blocks whose band ends inside the row
    if inside:
        view = (inside, heads, width, dim), (size * dim, length * dim, dim, 1)
        part, part_lse = FLASH(
            q[:, :, : inside * size].view(heads, inside, size, dim).transpose(0, 1),
            k.as_strided(*view),
            v.as_strided(*view),
            0.0,
            False,
            attn_mask=mask[:inside],
            scale=scale,
        )
        out[:, :, : inside * size] = part.transpose(0, 1).reshape(1, heads, inside * size, dim)
        lse[:, :, : inside * size] = part_lse.transpose(0, 1).reshape(1, heads, inside * size)
    for b in range(inside, blocks):
        start = b * size
        keys = length - start
        out[:, :, start : start + size], lse[:, :, start : start + size] = FLASH(
            q[:, :, start : start + size],
            k[:, :, start:],
            v[:, :, start:],
            0.0,
            False,
            attn_mask=mask[b : b + 1, :, :, :keys],
            scale=scale,
        )
    for b in range(1, blocks):
        rows = slice(b * size, (b + 1) * size)
        part, part_lse = FLASH(
            q[:, :, rows], k[:, :, : b * size], v[:, :, : b * size], 0.0, False, scale=scale
        )
        out[:, :, rows].lerp_(part, torch.sigmoid(part_lse - lse[:, :, rows]).unsqueeze(-1))
        torch.logaddexp(lse[:, :, rows], part_lse, out=lse[:, :, rows])
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
    print(f"{'layout':8} {'L':>5} {'pairs':>6} {'fast path':>10} {'W=64':>7} {'W=128':>7} {'band 256':>9}")
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
                "band 256": functools.partial(band, q, k, v, *band_mask(ends, 256)),
            }
            for name in ("W=64", "W=128", "band 256"):
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
            names = ("fast", "W=64", "W=128", "band 256")
            cells = [median[name] / median["causal"] / pairs for name in names]
            print(
                f"{layout:8} {length:5} {pairs:6.3f} "
                + " ".join(f"{c:>{w}.2f}" for c, w in zip(cells, (10, 7, 7, 9)))
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
