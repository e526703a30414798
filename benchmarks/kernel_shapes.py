"""Cost per query-key pair of one causal kernel call, by shape: the long causal call of a 2,048-token row
against the batched reversed squares that the fast path makes for short segments (chat, few-shot).

    python benchmarks/kernel_shapes.py --threads 1

Beside each causal call, the same shape unmasked ("full"): ``causal / full`` near 1 means the causal call
skipped no work, so a causal square costs its whole ``n x n`` (torch's CPU flash kernel skips key tiles of
512 only, so below 512 keys a causal square computes every pair and masks half).
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch

from segmask import kernels

SHAPES = (
    (1, 8, 2048, 64),
    (1, 8, 1024, 64),
    (1, 8, 512, 64),
    (1, 8, 256, 64),
    (2, 8, 128, 64),
    (4, 8, 56, 64),
    (8, 8, 32, 64),
    (16, 8, 16, 64),
)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, cpu-flash forward")
    print(
        f"{'shape [B, H, n, D]':22} {'causal ms':>10} {'ns per pair':>12} {'full ms':>10} {'ns per pair':>12}"
        f" {'causal / full':>14}"
    )
    for shape in SHAPES:
        q, k, v = (torch.randn(*shape) for _ in range(3))
        batch, heads, n, _ = shape
        seconds = {}
        for causal in (True, False):
            call = functools.partial(kernels.CPU_FLASH.forward, q, k, v, causal, shape[-1] ** -0.5)
            call()
            seconds[causal] = median_seconds(call, args.repeats)
        causal_pairs, full_pairs = batch * heads * n * (n + 1) / 2, batch * heads * n * n
        print(
            f"{str(list(shape)):22} {seconds[True] * 1e3:10.2f} {seconds[True] / causal_pairs * 1e9:12.1f}"
            f" {seconds[False] * 1e3:10.2f} {seconds[False] / full_pairs * 1e9:12.1f}"
            f" {seconds[True] / seconds[False]:14.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
