"""benchmarks/gpu.sh, the first CUDA run, in its dry mode: every step on CPU with tiny sizes, so that the
device's minutes go to measuring, not to typos. No timing is asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
STEPS = ("setup", "exactness", "generation", "training", "speed-attention", "speed-model")


def gpu_sh(*args: str, out: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def dry_run(stories_path, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu")
    return gpu_sh("--dry-run", "--threads", "1", "--stories", str(stories_path), out=out), out


def test_dry_run_runs_every_step_and_writes_its_files(dry_run):
    done, out = dry_run
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for step in STEPS:  # each step ran to its end: ok, or checks that failed, never a crash
        assert re.search(rf"^== {step} (ok|FAILED) \(", done.stdout, re.M), (step, done.stdout[-3000:])
    assert " ERROR " not in done.stdout
    assert {p.name for p in out.iterdir()} >= {"gpu.log", "results.json", "summary.txt"}
    results = json.loads((out / "results.json").read_text())
    assert list(results["steps"]) == list(STEPS)
    assert not [s for s in results["skipped"] if "time budget" in s["reason"]]
    names = {c["name"] for c in results["checks"]}
    for dtype in ("float32", "bfloat16", "float16"):  # every route of every dtype was checked
        assert {f"attention left-padded {dtype} fast", f"attention left-padded {dtype} eager"} <= names
        assert {f"model llama {dtype} segmask", f"model mistral {dtype} segmask"} <= names
    assert {
        "attention left-padded float32 flex",
        "generate cpu float32 row 0",
        "training trl fast bf16",
    } <= names
    impls = {(r["impl"], r["pass"]) for r in results["records"]["attention"]}
    assert {
        ("causal-sdpa", "fwd+bwd"),
        ("mas-fast", "fwd+bwd"),
        ("mas-dense", "fwd+bwd"),
        ("mas-flex", "fwd"),
    } <= impls
    variants = {(r["task"], r["variant"]) for r in results["records"]["model"] if r["ms"] is not None}
    assert {(t, v) for t in ("prefill", "lora-step") for v in ("causal", "mas-fast", "mas-dense")} <= variants
    assert (out / "gpu.log").read_text() in done.stdout
    summary = (out / "summary.txt").read_text()  # the speed tables in short end the output
    assert "attention alone" in summary and "whole model" in summary and summary in done.stdout


def test_dry_run_checks_pass_on_cpu(dry_run):
    """Every check holds on CPU, where the fast path's kernel is the CPU flash operators without their
    mask (the plan cuda-flash takes): the exit status is 0 once nothing fails."""
    done, out = dry_run
    checks = json.loads((out / "results.json").read_text())["checks"]
    failed = {c["name"] for c in checks if not c["ok"]}
    assert not failed, [c for c in checks if not c["ok"]]
    assert done.returncode == 0
    assert all(re.search(rf"^== {step} ok \(", done.stdout, re.M) for step in STEPS)


def test_without_cuda_and_without_dry_run_it_refuses_in_one_line(tmp_path):
    done = gpu_sh(out=tmp_path, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--dry-run" in done.stderr


def test_the_wheels_it_downloads_are_pinned_in_the_lock():
    """``gpu.sh prepare`` downloads the device's missing wheels at requirements/lock.txt's versions."""
    names = re.search(r"WHEELS=\(([^)]*)\)", SCRIPT.read_text()).group(1).split()
    lock = (ROOT / "requirements" / "lock.txt").read_text().lower()
    assert "transformers" in names and "trl" in names
    for name in names:
        assert re.search(rf"^{name}==", lock, re.M), name
