"""``segmask compare A.json B.json ...``: accuracy table, bar chart and McNemar tests of evaluation runs."""

from __future__ import annotations

import argparse

from segmask.compare import compare_runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results", nargs="+", help="results JSON files of `segmask eval`; the first is the baseline"
    )
    parser.add_argument("--out-md", default=None, help="also write the markdown table here")
    parser.add_argument("--out-png", default=None, help="write a grouped bar chart PNG here")


def run(args: argparse.Namespace) -> int:
    print(compare_runs(args.results, out_md=args.out_md, out_png=args.out_png), end="")
    if args.out_png:
        print(f"bar chart: {args.out_png}")
    return 0
