"""How long the command line takes to show its help: `segmask --help` and `segmask <command> --help`.

    python benchmarks/cli_start.py                  # 9 runs of each, median and min-max, with the machine
    python benchmarks/cli_start.py --repeats 3

Each help screen runs in a fresh process (what a user waits for), the screens taking turns in rotating
rounds (:mod:`rounds`), next to ``python -c "import segmask"``, the floor any command pays. The goal of
issue 32: under 0.5 s on 2 idle cores. The screens' imports are what decides this, and
``tests/cli/test_startup.py`` checks that no help screen imports torch, transformers or FastAPI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import Spread, describe, finish, interleaved, machine  # noqa: E402

from segmask.cli import COMMANDS  # noqa: E402

SCREENS = {"import segmask": ["-c", "import segmask"], "segmask --help": ["-m", "segmask", "--help"]} | {
    f"segmask {name} --help": ["-m", "segmask", name, "--help"] for name in COMMANDS if name != "lm-eval"
}


def run(argv: list[str]) -> None:
    subprocess.run(
        [sys.executable, *argv],
        check=True,
        stdout=subprocess.DEVNULL,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="rounds (default 9)")
    args = parser.parse_args()
    info = machine(threads=1)
    print(describe(info))
    times = interleaved({name: partial(run, argv) for name, argv in SCREENS.items()}, rounds=args.repeats)
    print(f"\n| what | median s | min-max s |  ({args.repeats} rounds, wall clock)\n|---|---|---|")
    for name, timed in times.items():
        spread = Spread.of(timed.wall)
        print(f"| `{name}` | {spread.median:.3f} | {spread.low:.3f}-{spread.high:.3f} |")
    print(finish(info))


if __name__ == "__main__":
    main()
