"""Timing that survives drift: the implementations take turns in rounds, and each round gives one ratio.

A shared machine's speed drifts over seconds (other processes, clock frequency, what the caches hold), so
two medians taken a minute apart differ by more than the effect being measured. Here each round runs every
implementation once, in an order that rotates from round to round (none always runs first, straight after
another warmed or cooled the caches), and a cell's figure is the median of the per-round ratios
``implementation / baseline``: drift slower than one round cancels within the round. Its spread, the
interquartile range and the min-max over the rounds, says how far a single run can be trusted.

    times = interleaved({"causal": run_causal, "mas": run_mas}, rounds=15)
    spread = Spread.of(ratios(times, "causal")["mas"])     # spread.median, spread.q1, ..., spread.text()

    python benchmarks/rounds.py a.json b.json               # two runs of one command, cell by cell

Every script that uses it prints :func:`machine` (CPU model, cores, threads) and the load average at its
start and end, since a ratio is only as good as the machine was quiet.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Times:
    """Per-round seconds of one implementation: wall clock and this process's CPU time."""

    wall: list[float]
    cpu: list[float]


def order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: ``names`` rotated by the round's index (a, b, c; b, c, a; ...)."""
    shift = round_index % len(names) if names else 0
    return [*names[shift:], *names[:shift]]


def interleaved(
    steps: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], object] | None = None,
) -> dict[str, Times]:
    """Time each step once per round, ``warmup`` untimed rounds first, in rotating order (:func:`order`).

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock is read. Returns each step's
    :class:`Times`, ``rounds`` entries long, round ``i`` at index ``i`` for every step.
    """
    names = list(steps)
    times = {name: Times([], []) for name in names}
    for index in range(-warmup, rounds):
        for name in order(names, index):
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            if sync is not None:
                sync()
            if index >= 0:
                times[name].wall.append(time.perf_counter() - start)
                times[name].cpu.append(time.process_time() - start_cpu)
    return times


def ratios(times: dict[str, list[float]], base: str) -> dict[str, list[float]]:
    """Per-round ratios ``times[name][i] / times[base][i]`` for every name (``base`` itself gives ones)."""
    return {name: [t / b for t, b in zip(ts, times[base], strict=True)] for name, ts in times.items()}


@dataclass(frozen=True)
class Spread:
    """The median of some values with their quartiles and extremes."""

    median: float
    q1: float
    q3: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no values to summarise")
        if len(values) == 1:
            q1 = q3 = values[0]
        else:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, min(values), max(values))

    def scaled(self, factor: float) -> Spread:
        """Every figure times ``factor`` (e.g. ``1 / pair_ratio``: quantiles commute with a positive scale)."""
        return Spread(*(factor * x for x in (self.median, self.q1, self.q3, self.low, self.high)))

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {
            "median": round(self.median, digits),
            "iqr": [round(self.q1, digits), round(self.q3, digits)],
            "range": [round(self.low, digits), round(self.high, digits)],
        }

    def text(self, spec: str = ".3f") -> str:
        """``median [q1-q3] (min-max)``, e.g. ``1.043 [1.021-1.060] (0.990-1.120)``."""
        f = lambda x: format(x, spec)  # noqa: E731
        return f"{f(self.median)} [{f(self.q1)}-{f(self.q3)}] ({f(self.low)}-{f(self.high)})"


def cpu_model() -> str:
    """The CPU: model name, family/model, clock and L3 (``/proc/cpuinfo`` and sysfs), else ``lscpu``'s model
    name, else what ``platform`` knows. A virtual machine may name only the vendor ("AMD EPYC"): the
    family and model numbers then tell the generation apart."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if name is None:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
            name = next(
                (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name:")), None
            )
        except (OSError, subprocess.SubprocessError):
            pass
    if name is None:
        return platform.processor() or platform.machine()
    details = []
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']}")
    if "cpu mhz" in fields:
        details.append(f"{float(fields['cpu mhz']):.0f} MHz")
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            details.append(f"L3 {f.read().strip()}")
    except OSError:
        pass
    return f"{name} ({', '.join(details)})" if details else name


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages (runnable processes; the machine is idle near 0)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine(threads: int, device: str = "cpu") -> dict:
    """What a result depends on: CPU model, cores, threads, torch, the device and the load now."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "load_start": load_average(),
    }
    return info


def describe(info: dict) -> str:
    """One line for a table's head: ``Intel(R) Xeon(R) ..., 2 cores, 1 threads, torch 2.13.0, load 5.80``."""
    device = "" if info["device"] == "cpu" else f", {info['device']}"
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['threads']} threads{device}, torch {info['torch']}, "
        f"load average at start {info['load_start'][0]:.2f} (1 min) {info['load_start'][1]:.2f} (5 min)"
    )


def finish(info: dict) -> str:
    """Record the load at the end in ``info`` and say it in one line."""
    info["load_end"] = load_average()
    return (
        f"load average at end {info['load_end'][0]:.2f} (1 min) {info['load_end'][1]:.2f} (5 min); "
        f"{info['cores']} cores"
    )


def write_json(path: str | None, info: dict, records: list) -> None:
    """Write a run's ``{"machine", "command", "records"}`` to ``path`` (nothing when ``path`` is None); the
    scripts call it as they go, so a long run that is stopped keeps what it measured."""
    if path:
        with open(path, "w") as f:
            json.dump({"machine": info, "command": sys.argv, "records": records}, f, indent=1)


# --------------------------------------------------------------------------------------------- two runs

CELL_FIELDS = ("task", "layout", "seq_len", "batch", "pass", "impl", "variant")


def agreement(
    first: list[dict], second: list[dict], tolerance: float = 0.03, field: str = "ratio_to_causal"
) -> list[dict]:
    """Cell by cell, how far two runs' ``field`` (a ratio to causal) differs: ``(b - a) / a``, and whether
    within ``tolerance`` (issue 35: two runs of one command on an idle machine agree within about 3 %)."""
    key = lambda r: tuple(r.get(f) for f in CELL_FIELDS)  # noqa: E731
    seconds = {key(r): r for r in second}
    rows = []
    for a in first:
        b = seconds.get(key(a))
        if b is None or a.get(field) is None or a[field] == b[field] == 1:
            continue  # the baseline itself, or a cell only one run has
        difference = (b[field] - a[field]) / a[field]
        cell = " ".join(str(v) for v in key(a) if v is not None)
        rows.append(
            {
                "cell": cell,
                "first": a[field],
                "second": b[field],
                "difference": difference,
                "within": abs(difference) <= tolerance,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/rounds.py A.json B.json``: how well two runs of one command agree, cell by cell."""
    import argparse

    parser = argparse.ArgumentParser(description="How well two --json runs agree per cell (x causal).")
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--tolerance", type=float, default=0.03, help="agreement asked for (default 0.03)")
    parser.add_argument(
        "--cpu", action="store_true", help="compare the CPU-time ratios (cpu_ratio_to_causal) instead of wall"
    )
    args = parser.parse_args(argv)
    runs = []
    for path in (args.first, args.second):
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as error:
            print(f"{path}: {error}", file=sys.stderr)
            return 2
    field = "cpu_ratio_to_causal" if args.cpu else "ratio_to_causal"
    rows = agreement(runs[0]["records"], runs[1]["records"], args.tolerance, field)
    for run, path in zip(runs, (args.first, args.second), strict=True):
        m = run["machine"]
        print(f"{path}: {m['cpu']}, {m['threads']} threads, load {m['load_start'][0]} -> {m['load_end'][0]}")
    print(f"{'cell':40} {'first':>7} {'second':>7} {'diff':>7}")
    for r in rows:
        mark = "" if r["within"] else f"  outside {args.tolerance:.0%}"
        print(f"{r['cell']:40} {r['first']:>7.3f} {r['second']:>7.3f} {r['difference']:>+7.1%}{mark}")
    within = sum(r["within"] for r in rows)
    print(f"{within} of {len(rows)} cells within {args.tolerance:.0%} ({field})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
