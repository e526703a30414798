"""``segmask compare A.json B.json ...``: accuracy table, bar chart and McNemar tests of evaluation runs."""

from __future__ import annotations

import argparse

from segmask.files import check_outputs
from segmask.results import predictions_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results", nargs="+", help="results JSON files of `segmask eval`; the first is the baseline"
    )
    parser.add_argument("--out-md", default=None, help="also write the markdown table here")
    parser.add_argument("--out-png", default=None, help="write a grouped bar chart PNG here")


def run(args: argparse.Namespace) -> int:
    from segmask.compare import compare_runs  # noqa: PLC0415 (scipy: not at --help)

    inputs = [*args.results, *(predictions_path(path) for path in args.results)]
    check_outputs([("--out-md", args.out_md), ("--out-png", args.out_png)], inputs)
    print(compare_runs(args.results, out_md=args.out_md, out_png=args.out_png), end="")
    if args.out_png:
        print(f"bar chart: {args.out_png}")
    return 0
