"""benchmarks/rounds.py: the drift-proof timing method of issue 35 (rotating order, per-round ratios)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import rounds  # noqa: E402


def test_order_rotates_so_that_each_implementation_leads_in_turn():
    names = ["causal", "mas", "dense"]
    orders = [rounds.order(names, i) for i in range(3)]
    assert orders == [["causal", "mas", "dense"], ["mas", "dense", "causal"], ["dense", "causal", "mas"]]
    assert [o[0] for o in orders] == names


def test_interleaved_runs_every_step_once_per_round_in_rotating_order():
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = rounds.interleaved(steps, rounds=3, warmup=1)
    # round -1 (warm-up, untimed) is rotated too: b a; then a b, b a, a b
    assert calls == ["b", "a", "a", "b", "b", "a", "a", "b"]
    assert all(len(t.wall) == 3 and len(t.cpu) == 3 for t in times.values())


def test_a_drift_between_rounds_cancels_in_the_per_round_ratios():
    """Round i runs everything 1 + i times slower (drift); mas costs 1.05 x causal within every round. The
    ratio of the medians would mix in the drift's order; the per-round ratios are exactly 1.05."""
    causal = [1.0 + i for i in range(15)]
    mas = [1.05 * t for t in causal]
    ratios = rounds.ratios({"causal": causal, "mas": mas}, "causal")
    spread = rounds.Spread.of(ratios["mas"])
    assert spread.median == pytest.approx(1.05) and spread.low == pytest.approx(spread.high)
    assert ratios["causal"] == [1.0] * 15


def test_spread_is_median_quartiles_and_extremes():
    spread = rounds.Spread.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (spread.median, spread.q1, spread.q3, spread.low, spread.high) == (3.0, 2.0, 4.0, 1.0, 5.0)
    assert spread.scaled(0.5).median == 1.5
    assert spread.as_dict() == {"median": 3.0, "iqr": [2.0, 4.0], "range": [1.0, 5.0]}
    assert rounds.Spread.of([2.0]).q1 == rounds.Spread.of([2.0]).q3 == 2.0
    with pytest.raises(ValueError):
        rounds.Spread.of([])


def test_machine_names_the_cpu_threads_and_the_load_at_start_and_end():
    info = rounds.machine(threads=1)
    assert info["cpu"] and info["threads"] == 1 and len(info["load_start"]) == 3
    assert info["cpu"] in rounds.describe(info)
    assert "load average at end" in rounds.finish(info) and len(info["load_end"]) == 3


def test_agreement_compares_two_runs_cell_by_cell_against_the_tolerance():
    cell = {"layout": "chat", "seq_len": 2048, "batch": 1, "pass": "fwd"}
    first = [
        {**cell, "impl": "causal-sdpa", "ratio_to_causal": 1.0},
        {**cell, "impl": "mas-fast", "ratio_to_causal": 1.0},
    ]
    second = [
        {**cell, "impl": "causal-sdpa", "ratio_to_causal": 1.0},
        {**cell, "impl": "mas-fast", "ratio_to_causal": 1.04},
    ]
    [row] = rounds.agreement(first, second)  # the baseline's own row is left out
    assert row["cell"] == "chat 2048 1 fwd mas-fast"
    assert row["difference"] == pytest.approx(0.04) and not row["within"]
    assert rounds.agreement(first, second, tolerance=0.05)[0]["within"]


def test_agreement_script_prints_each_cell_and_the_count(tmp_path, capsys):
    import json

    machine = {"cpu": "X", "threads": 1, "load_start": [0.1, 0.1, 0.1], "load_end": [0.2, 0.2, 0.2]}
    cell = {"layout": "fewshot", "seq_len": 4096, "batch": 1, "pass": "fwd+bwd", "impl": "mas-fast"}
    for name, ratio in (("a", 1.02), ("b", 1.01)):
        record = {**cell, "ratio_to_causal": ratio, "cpu_ratio_to_causal": 1.0}
        (tmp_path / f"{name}.json").write_text(json.dumps({"machine": machine, "records": [record]}))
    assert rounds.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "fewshot 4096 1 fwd+bwd mas-fast" in out and "-1.0%" in out
    assert "1 of 1 cells within 3% (ratio_to_causal)" in out
    assert rounds.main([str(tmp_path / "a.json"), str(tmp_path / "missing.json")]) == 2
