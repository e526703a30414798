"""segmask's first CUDA run in one call: exactness, generation, training, then speed; run by benchmarks/gpu.sh.

    benchmarks/gpu.sh                          # on the device: every step, results under $OUT
    benchmarks/gpu.sh --dry-run                # here, on CPU with tiny sizes: every step, to catch typos
    benchmarks/gpu.sh --steps training speed-model --budget-s 200     # a rerun of some steps

Steps (``--steps``; each prints its checks, then ``== STEP ok (S s)``, ``== STEP FAILED (n of m checks)``
or ``== STEP ERROR ...``):

    setup            versions, the device, its matmul and copy ceilings; transformers in segmask's range
    exactness        gpu/exactness.py: fast path (cuda-flash), eager and flex against float64 dense SDPA
    generation       gpu/generation.py: segmask.generate greedy on stories260K, device against CPU
    training         gpu/training.py: one LoRA step of a 1B-shape model, segmask train and TRL, bf16
    speed-attention  gpu/speed.py: attention alone against causal SDPA, 4k-16k tokens, bf16
    speed-model      gpu/speed.py: the 1B-shape model's prefill and LoRA step against causal

Writes ``results.json`` (every check, record and step, after each step) and ``summary.txt`` under
``--out``; ``gpu.sh`` adds ``gpu.log``. No case or cell starts after ``--budget-s`` seconds (it says so),
so the run ends inside the device call's limit. Exit status 0 when every step is ok, else 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # these modules, and benchmarks/attention.py and model.py

import torch  # noqa: E402
from common import DTYPES, Run  # noqa: E402

STEPS = ("setup", "exactness", "generation", "training", "speed-attention", "speed-model")
# each step's share of the budget (a step stops starting cases after its share, times SLACK, is spent), so
# that a slow step never starves the ones after it; the shares are those of a device run's expected times
SHARES = {
    "setup": 30,
    "exactness": 130,
    "generation": 30,
    "training": 90,
    "speed-attention": 110,
    "speed-model": 80,
}
SLACK = 1.2
DEFAULT_STORIES = (Path(".carry/stories260K"), HERE.parents[2] / "shared" / "models" / "stories260K")


def setup(run: Run, args: argparse.Namespace) -> None:
    import importlib.metadata

    versions = {}
    for name in ("torch", "triton", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
                 "huggingface_hub", "safetensors", "regex", "numpy"):  # fmt: skip
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import transformers

    run.info.update(
        versions=versions,
        python=platform.python_version(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        device=torch.cuda.get_device_name() if run.cuda else "cpu (dry run)",
        transformers_path=str(Path(transformers.__file__).parent),
        dry_run=run.dry,
    )
    for key in ("python", "machine", "device", "transformers_path"):
        run.note(f"{key}: {run.info[key]}")
    run.note("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    from segmask import compat

    try:
        compat.check_version()
        run.check("transformers in segmask's range", True, transformers.__version__)
    except compat.TransformersChangedError as error:
        run.check("transformers in segmask's range", False, str(error))
    for name in ("trl", "datasets", "peft"):
        try:
            __import__(name)
            run.check(f"import {name}", True, versions[name] or "")
        except Exception as error:  # noqa: BLE001 - reported, and the steps needing it fail on their own
            run.check(f"import {name}", False, f"{type(error).__name__}: {error}")
    run.check("stories260K", (run.stories / "config.json").is_file(), str(run.stories))
    ceilings(run)


def ceilings(run: Run) -> None:
    """The two numbers METHOD.md asks for first: a bf16 matrix product's rate and a device copy's bandwidth."""
    n = 1024 if run.dry else 8192
    dtype = torch.float32 if run.dry else torch.bfloat16
    a, b = (torch.randn(n, n, device=run.device, dtype=dtype) for _ in "ab")
    x = torch.randn(2**22 if run.dry else 2**28, device=run.device)  # 16 MiB / 1 GiB
    y = torch.empty_like(x)

    def median(fn, repeats: int) -> float:
        fn()
        run.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            run.sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    matmul = median(lambda: a @ b, 3 if run.dry else 10)
    copy = median(lambda: y.copy_(x), 3 if run.dry else 10)
    rate, bandwidth = 2 * n**3 / matmul / 1e12, 2 * x.numel() * x.element_size() / copy / 1e9
    run.info["ceilings"] = {"matmul_tflops": round(rate, 1), "copy_gb_s": round(bandwidth, 1)}
    run.note(
        f"ceilings: {n}^3 {dtype} matrix product {rate:.1f} TFLOP/s, copy {bandwidth:.0f} GB/s (read + write)"
    )


def exactness(run: Run, args: argparse.Namespace) -> None:
    import exactness as step

    step.main(run, [DTYPES[d] for d in args.dtypes], [DTYPES[d] for d in args.flex_dtypes], args.layouts)


def generation(run: Run, args: argparse.Namespace) -> None:
    import generation as step

    step.main(run)


def training(run: Run, args: argparse.Namespace) -> None:
    import training as step

    step.main(run)


def speed_attention(run: Run, args: argparse.Namespace) -> None:
    import speed

    speed.attention_speed(run, args.speed_layouts)


def speed_model(run: Run, args: argparse.Namespace) -> None:
    import speed

    speed.model_speed(run, args.model_layouts, ["prefill", "lora-step"], args.model_variants)


FUNCTIONS = {
    "setup": setup,
    "exactness": exactness,
    "generation": generation,
    "training": training,
    "speed-attention": speed_attention,
    "speed-model": speed_model,
}


def speed_summary(records: dict[str, list[dict]]) -> list[str]:
    """The speed tables in short: per cell, each MAS route's time over causal's (attention alone: and over
    the allowed pairs' ratio, the goal being <= 1.10), and its peak memory over causal's."""
    lines = []
    cells: dict[tuple, dict[str, dict]] = {}
    for r in records.get("attention", []):
        cells.setdefault((r["layout"], r["seq_len"], r["pass"]), {})[r["impl"]] = r
    if cells:
        lines.append("attention alone: x causal (/pairs, peak x causal) per route")
    for (layout, seq_len, kind), impls in cells.items():
        causal = impls.get("causal-sdpa", {}).get("peak_mib")
        parts = [
            f"{name.removeprefix('mas-')} {r['ratio_to_causal']:.2f} ({r['ratio_to_causal'] / r['pair_ratio']:.2f}"
            + (f", {r['peak_mib'] / causal:.2f})" if causal else ")")
            for name, r in impls.items()
            if name != "causal-sdpa" and r.get("ratio_to_causal") is not None
        ]
        causal_ms = impls.get("causal-sdpa", {}).get("ms")
        lines.append(f"  {layout:7} {seq_len:>6} {kind:7} causal {causal_ms} ms: " + ", ".join(parts))
    rows = [r for r in records.get("model", []) if r["variant"] != "causal"]
    if rows:
        lines.append("whole model: x causal (peak x causal) per variant")
    for r in rows:
        ratio, peak = r["ratio_to_causal"], r["peak_ratio_to_causal"]
        lines.append(
            f"  {r['task']:9} {r['layout']:7} {r['seq_len']:>6} {r['variant']:9} "
            + (f"{ratio:.3f} ({peak:.2f})" if ratio is not None and peak is not None else str(r["ms"]))
        )
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="on CPU with tiny sizes (here, before the device)"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu"))
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument(
        "--budget-s", type=float, default=None, help="no case starts after this (device: 400)"
    )
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--flex-dtypes", nargs="+", choices=tuple(DTYPES), default=None,
                        help="dtypes flex is checked in (device: bfloat16 float32; dry run: float32)")  # fmt: skip
    parser.add_argument(
        "--layouts", type=int, default=None, help="random layouts per dtype (device 8, dry 4)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds, attention (device 10, dry 2)"
    )
    parser.add_argument(
        "--model-repeats", type=int, default=None, help="timed rounds, model (device 5, dry 2)"
    )
    parser.add_argument("--attention-lengths", type=int, nargs="+", default=None)
    parser.add_argument("--model-lengths", type=int, nargs="+", default=None)
    parser.add_argument("--speed-layouts", nargs="+", default=["prompt", "chat", "fewshot"])
    parser.add_argument("--model-layouts", nargs="+", default=["prompt", "fewshot"])
    parser.add_argument(
        "--model-variants",
        nargs="+",
        choices=("mas-fast", "mas-dense", "mas-flex"),
        default=["mas-fast", "mas-dense"],
        help="the whole model's variants besides causal (mas-flex compiles per length: tens of seconds each)",
    )
    parser.add_argument(
        "--stories", type=Path, default=None, help="stories260K (default: .carry/, ../shared/)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    dry = args.dry_run
    defaults = dict(
        budget_s=900 if dry else 400,  # dry: a loaded machine is slow, and nothing may be skipped
        flex_dtypes=["float32"] if dry else ["bfloat16", "float32"],
        layouts=4 if dry else 8,
        repeats=2 if dry else 10,
        model_repeats=2 if dry else 5,
        # the ends of the range first: a budget cut drops 8,192
        attention_lengths=[128] if dry else [4096, 16384, 8192],
        model_lengths=[128] if dry else [4096, 16384, 8192],
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.stories is None:
        args.stories = next((p for p in DEFAULT_STORIES if p.is_dir()), DEFAULT_STORIES[0])
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch._dynamo.config.cache_size_limit = 64
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "benchmarks/gpu/run.py: no CUDA device here; use --dry-run to run every step on CPU",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="segmask-gpu-"))
    run = Run(
        device=torch.device("cpu" if args.dry_run else "cuda"),
        dry=args.dry_run,
        out=args.out,
        work=work,
        stories=args.stories,
        deadline=started + args.budget_s,
        repeats=args.repeats,
        model_repeats=args.model_repeats,
        attention_lengths=args.attention_lengths,
        model_lengths=args.model_lengths,
    )
    run.info["arguments"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(f"segmask GPU run{' (dry run, CPU, tiny sizes)' if run.dry else ''}: steps {' '.join(args.steps)}, "
          f"budget {args.budget_s:.0f} s, out {args.out}", flush=True)  # fmt: skip
    results: dict[str, dict] = {}
    try:
        for name in args.steps:
            run.step = name
            print(f"== {name}", flush=True)
            start = time.monotonic()
            share = args.budget_s * SHARES[name] / sum(SHARES[n] for n in args.steps) * SLACK
            run.deadline = min(started + args.budget_s, start + share)
            error = None
            if started + args.budget_s - start <= 0:
                status = "skipped (time budget spent)"
            else:
                try:
                    FUNCTIONS[name](run, args)
                except Exception as caught:  # noqa: BLE001 - a step's crash is reported; the next step runs
                    traceback.print_exc(file=sys.stdout)
                    error = (
                        f"{type(caught).__name__}: {str(caught).splitlines()[0][:300] if str(caught) else ''}"
                    )
                checks = [c for c in run.checks if c["step"] == name]
                failed = [c for c in checks if not c["ok"]]
                if error is not None:
                    status = f"ERROR {error}"
                elif failed:
                    status = f"FAILED ({len(failed)} of {len(checks)} checks)"
                else:
                    status = "ok"
            seconds = time.monotonic() - start
            skipped = len([s for s in run.skipped if s["step"] == name])
            results[name] = {"status": status, "seconds": round(seconds, 1), "skipped": skipped}
            print(
                f"== {name} {status} ({seconds:.1f} s{f', {skipped} skipped' if skipped else ''})", flush=True
            )
            run.write(results)
            run.free()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"{run.info.get('device', run.device.type)}; " + ", ".join(
        f"{k} {v}" for k, v in run.info.get("versions", {}).items() if k in ("torch", "transformers", "trl")
    )]  # fmt: skip
    lines += [
        f"{name:16} {r['status']:40} {r['seconds']:7.1f} s  {r['skipped']} skipped"
        for name, r in results.items()
    ]
    lines.append(f"{'total':16} {'':40} {time.monotonic() - started:7.1f} s")
    failed = [c for c in run.checks if not c["ok"]]
    lines += [f"FAILED {c['step']}: {c['name']}: {c['detail']}" for c in failed]
    lines += speed_summary(run.records)
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(["== summary", *lines]), flush=True)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
