"""The MAS study's runner (experiments/mas_study): both layouts hold the same items, the conditions differ only
in the mask, a unit runs end to end on stories260K (curve, accuracy bits, cross-mask, leak checks, CPU time),
resumes, refuses other settings, commits only its own files; the pilot stays causal-only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments" / "mas_study"))

import pilot  # noqa: E402  (experiments/mas_study/pilot.py: scripts, not part of the package)
import run  # noqa: E402
import status  # noqa: E402

TINY = {
    "source": "segmask.tasks.reading",
    "params": {
        "people": ["Mary", "John"],
        "min_sentences": 1,
        "max_sentences": 2,
        "pickups": 1,
        "two_hop": True,
    },
}


@pytest.mark.parametrize("task", ["reading", "family"])
def test_both_layouts_hold_the_same_items_in_the_same_order(task):
    if task == "family":
        pytest.importorskip("reasoning_gym")
    records = run.task_records(task, 6, 4, seed=0)
    assert set(records) == {"after", "first"}
    for split in (0, 1):
        after, first = records["after"][split], records["first"][split]
        assert [r["answer"] for r in after] == [r["answer"] for r in first]
        for a, f in zip(after, first):
            assert sorted(a["instruction"].split("\n\n")) == sorted(f["instruction"].split("\n\n"))
            question = next(p for p in a["instruction"].split("\n\n") if p.startswith("Question: "))
            assert a["instruction"].endswith(question) and not f["instruction"].endswith(question)
            assert f["instruction"].index(question) < a["instruction"].index(question)
    train_keys = {r["instruction"] for r in records["after"][0]}
    assert not train_keys & {r["instruction"] for r in records["after"][1]}


def test_conditions_and_layouts_differ_only_in_what_they_name():
    args = run.parse_args(["--steps", "8"])
    base = run.unit_settings(args, "reading", "after", "causal", 0, "h")
    assert args.acc_steps == [2, 4, 6] and args.train_size == 32
    expected = {
        ("after", "mas"): {"condition", "mask"},  # the paper's mask: causal_sink False, as causal's
        ("after", "mas_sink"): {"condition", "mask", "causal_sink"},
        ("first", "causal"): {"layout"},
    }
    for (layout, condition), names in expected.items():
        other = run.unit_settings(args, "reading", layout, condition, 0, "h")
        assert {key for key in base if base[key] != other[key]} == names
    assert (run.MASKS["mas"], run.MASKS["mas_sink"]) == (("mas", False), ("mas", True))
    # seed-major: every condition of a (task, layout) before the next seed
    order = run.units(run.parse_args(["--seeds", "0", "1"]))
    assert order[:3] == [("reading", "after", c, 0) for c in ("causal", "mas", "mas_sink")]
    assert {u[3] for u in order[:12]} == {0} and len(order) == 24


def test_a_unit_runs_end_to_end_resumes_and_refuses_other_settings(
    tmp_path, stories_path, monkeypatch, capsys
):
    monkeypatch.setitem(run.TASKS, "tiny", TINY)
    monkeypatch.setattr(status, "TASKS", {"tiny": TINY})
    out = tmp_path / "study"
    argv = [
        "--model", str(stories_path), "--steps", "2", "--eval-every", "1", "--test-size", "4",
        "--loss-size", "2", "--acc-size", "3", "--tasks", "tiny", "--layouts", "after", "--conditions", "mas", "--seeds", "0", "--out", str(out),
    ]  # fmt: skip
    assert run.main(argv) == 0
    unit = run.unit_dir(out, "tiny", "after", "mas", 0)
    summary = json.loads((unit / "unit.json").read_text())
    assert set(summary["final"]) == {"causal", "mas", "mas_sink"}  # cross-mask evaluation
    assert all(len(score["correct_bits"]) == 4 == score["n"] for score in summary["final"].values())
    assert all(value == 0.0 for value in summary["leak_check_final"].values())
    curve = summary["curve"]
    assert [r["step"] for r in curve if r["kind"] == "loss"] == [0, 1, 2]
    [checkpoint] = [r for r in curve if r["kind"] == "accuracy"]
    assert (
        checkpoint["step"] == 1 and checkpoint["leak_check"] == 0.0 and len(checkpoint["correct_bits"]) == 3
    )
    assert summary["settings"]["causal_sink"] is False and summary["cpu_time_s"]["total"] > 0
    assert len(summary["code_at_start"]["head"]) == 40
    assert json.loads((out / "data" / "tiny" / "first" / "tiny_test.json").read_text())  # both layouts drawn

    assert run.main(argv) == 0
    assert "mas seed 0: already done" in capsys.readouterr().out
    assert run.main(argv + ["--learning-rate", "5e-4"]) == 2
    assert "was run with other settings" in capsys.readouterr().err

    text = status.status(out, [0], 2)
    assert "tiny     question-after mas       seed 0: done: own-mask accuracy" in text
    assert "1 of 6 units done, 5 left" in text and f"--out {out}" in text
    assert f"--tasks tiny --out {out} --seeds 0 >> {out / 'study.log'}" in text  # the per-task runner


def test_commit_unit_commits_only_the_units_files(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (repo / "other.txt").write_text("someone else's work\n")
    git("add", "other.txt")  # staged by another helper: must stay out of the unit's commit
    unit = repo / "results" / "runs" / "seed0"
    unit.mkdir(parents=True)
    for name in ("config.json", "curve.jsonl", "unit.json", "ignored.bin"):
        (unit / name).write_text("{}\n")
    assert run.commit_unit(unit, "unit done", repo=repo)
    assert git("log", "--format=%s") == "unit done\n"
    committed = git("show", "--name-only", "--format=", "HEAD").split()
    assert committed == [f"results/runs/seed0/{n}" for n in ("config.json", "curve.jsonl", "unit.json")]
    assert "A  other.txt" in git("status", "--short")


def test_pilot_is_causal_only(capsys):
    assert pilot.main(["--try", "no/name"]) == 2 and "--try needs a name" in capsys.readouterr().err
    assert pilot.FORCED[:4] == ["--conditions", "causal", "--eval-masks", "causal"]
    for flag in ("--conditions", "--eval-masks"):
        assert pilot.main([flag, "mas"]) == 2
        assert "fixed in the pilot" in capsys.readouterr().err


def test_summary_computes_the_pre_registered_endpoint(tmp_path):
    """Gains per layout paired by seed, and the interaction (after minus first), from synthetic units."""
    import summarize

    accuracy = {  # (layout, condition) -> per seed 0, 1, 2
        ("after", "causal"): [0.50, 0.60, 0.55],
        ("after", "mas"): [0.70, 0.65, 0.75],
        ("after", "mas_sink"): [0.50, 0.60, 0.60],
        ("first", "causal"): [0.70, 0.70, 0.75],
        ("first", "mas"): [0.70, 0.75, 0.75],
        ("first", "mas_sink"): [0.65, 0.70, 0.75],
    }
    for (layout, condition), values in accuracy.items():
        for seed, value in enumerate(values):
            unit = run.unit_dir(tmp_path, "reading", layout, condition, seed)
            unit.mkdir(parents=True)
            bits = "1" * round(20 * value) + "0" * (20 - round(20 * value))
            final = {m: {"accuracy": value, "correct_bits": bits, "n": 20} for m in run.CONDITIONS}
            (unit / "curve.jsonl").write_text(json.dumps({"kind": "loss", "step": 0, "loss": 1.0}) + "\n")
            summary = {"final": final, "own_mask": condition, "leak_check_final": {condition: 0.0}}
            (unit / "unit.json").write_text(json.dumps(summary | {"cpu_time_s": {"total": 600.0}}))
    result = summarize.summarize(tmp_path)["tasks"]["reading"]
    after, first = result["gain"]["mas"]["after"], result["gain"]["mas"]["first"]
    assert after["per_seed"] == pytest.approx({0: 0.20, 1: 0.05, 2: 0.20})
    assert first["per_seed"] == pytest.approx({0: 0.0, 1: 0.05, 2: 0.0})
    assert after["mean"] == pytest.approx(0.15) and after["ci_low"] < 0.15 < after["ci_high"]
    interaction = result["interaction"]["mas"]
    assert interaction["per_seed"] == pytest.approx({0: 0.20, 1: 0.0, 2: 0.20})
    assert interaction["mean"] == pytest.approx(0.4 / 3) and interaction["n_seeds"] == 3
    assert result["interaction"]["mas_sink"]["per_seed"] == pytest.approx({0: 0.05, 1: 0.0, 2: 0.05})
    assert result["mcnemar"]["mas/after/0"] == {"only_causal": 0, "only_variant": 4, "p_value": 0.125}
    # the pre-registered reading: three seeds of +20, +5, +20 points give a t interval of about [-6, +36]
    # (t = 4.30 at 2 df), not above 0, so mas is null here; mas_sink's gain after (0, 0, +5) too
    assert after["ci_low"] < 0 and result["reading"] == {"mas": "null", "mas_sink": "null"}
    assert result["mas_vs_sink_after"]["per_seed"] == pytest.approx({0: 0.20, 1: 0.05, 2: 0.15})
    assert result["mas_vs_sink_after"]["ci_low"] < 0 < result["mas_vs_sink_after"]["ci_high"]
    text = (tmp_path / "summary.md").read_text()
    assert "| mas | after − first | 0: +20.0, 1: +0.0, 2: +20.0 | +13.3 [" in text
    # one task only: the default cannot be decided, and stays
    assert "not yet decidable" in text and "the default stays" in text
    assert (tmp_path / "interaction.png").stat().st_size > 0 and (tmp_path / "curves.png").exists()


def test_the_pre_registered_reading_and_default_rule():
    """The rules of results/mas_study/README.md, on intervals given directly."""
    import summarize

    def test(low, high):
        return {"ci_low": low, "ci_high": high, "mean": None if low is None else (low + high) / 2}

    up, around, down = test(0.02, 0.10), test(-0.03, 0.05), test(-0.10, -0.01)
    assert summarize.reading_of(up, around, up) == "MAS helps through the mechanism"
    assert summarize.reading_of(up, up, around) == "MAS helps, but not through this mechanism"
    assert summarize.reading_of(up, around, around) == "null"
    assert summarize.reading_of(down, up, down) == "null"
    assert summarize.reading_of(up, test(None, None), up).startswith("not yet computable")
    both = {"tasks": {"family": {"mas_vs_sink_after": up}, "reading": {"mas_vs_sink_after": up}}}
    assert summarize.default_decision(both).endswith("make it the default")
    one = {"tasks": {"family": {"mas_vs_sink_after": up}, "reading": {"mas_vs_sink_after": around}}}
    assert summarize.default_decision(one).endswith("the default (the sink) stays")


def test_summary_secondary_analyses(tmp_path):
    """The pre-registration's secondary analyses from synthetic units: each condition's after minus first,
    the checkpoint accuracies, and the reading task's gains on one-hop and two-hop items apart (the items
    drawn again as the runner draws them, and checked against the units' data hash)."""
    import argparse

    import summarize

    sizes = argparse.Namespace(train_size=4, test_size=12, data_seed=0)
    folder, digest = run.prepare_data(sizes, tmp_path, "reading")
    records = json.loads((folder / "after" / "reading_test.json").read_text())
    two_hop = ["Where is the " in r["instruction"] for r in records]
    assert 0 < sum(two_hop) < len(two_hop)
    settings = vars(sizes) | {"task": "reading", "task_spec": run.TASKS["reading"], "data_sha256": digest}
    settings |= {"steps": 100, "acc_size": 6}
    for layout, shift in (("after", 0.0), ("first", 0.1)):
        for condition in run.CONDITIONS:
            for seed in (0, 1):
                # causal gets the one-hop items right and the two-hop ones wrong; mas and mas_sink all right
                right = [not hop for hop in two_hop] if condition == "causal" else [True] * len(two_hop)
                bits = "".join("1" if r else "0" for r in right)
                value = bits.count("1") / len(bits)
                unit = run.unit_dir(tmp_path, "reading", layout, condition, seed)
                unit.mkdir(parents=True)
                (unit / "curve.jsonl").write_text(json.dumps({"kind": "loss", "step": 0, "loss": 1.0}) + "\n")
                curve = [
                    {"kind": "accuracy", "step": 50, "mask": condition, "accuracy": 0.2 + shift + seed / 10}
                ]
                summary = {
                    "settings": settings | {"layout": layout, "condition": condition, "seed": seed},
                    "final": {m: {"accuracy": value, "correct_bits": bits} for m in run.CONDITIONS},
                    "own_mask": condition,
                    "curve": curve,
                    "leak_check_final": {condition: 0.0},
                    "cpu_time_s": {"total": 600.0},
                }
                (unit / "unit.json").write_text(json.dumps(summary))
    found = summarize.summarize(tmp_path)["tasks"]["reading"]["secondary"]
    assert found["order"]["causal"]["per_seed"] == {0: 0.0, 1: 0.0}
    assert found["checkpoints"]["first"]["mas"][50]["mean"] == pytest.approx(0.35)
    assert found["checkpoints"]["after"]["causal"][100]["mean"] == pytest.approx(
        1 - sum(two_hop) / len(two_hop)
    )
    for layout in run.LAYOUTS:
        kinds = found["by_question_kind"]["mas"][layout]
        assert kinds["two-hop"]["per_seed"] == pytest.approx({0: 1.0, 1: 1.0})
        assert kinds["one-hop"]["per_seed"] == pytest.approx({0: 0.0, 1: 0.0})
    text = (tmp_path / "summary.md").read_text()
    assert f"| mas | after | two-hop ({sum(two_hop)}) | 0: +100.0, 1: +100.0 | +100.0" in text
    with pytest.raises(ValueError, match="does not hold the items"):
        summarize.question_kinds(tmp_path, settings | {"layout": "after", "data_sha256": "0" * 64})


def test_the_long_arms_registered_reading():
    """The exploratory arm's rule (results/mas_study/README.md): catches up if mas >= causal in both seeds,
    still trails if below with McNemar p < 0.05 in both, else unresolved."""
    import summarize

    def entry(d0, p0, d1, p1):
        gain = {"mas": {"after": {"per_seed": {0: d0, 1: d1}}}}
        return {"gain": gain, "mcnemar": {"mas/after/0": {"p_value": p0}, "mas/after/1": {"p_value": p1}}}

    assert summarize.long_arm_reading(entry(0.0, 1.0, 0.02, 0.5)) == "MAS catches up"
    assert summarize.long_arm_reading(entry(-0.1, 0.01, -0.08, 0.04)) == "MAS still trails"
    assert summarize.long_arm_reading(entry(-0.1, 0.01, -0.02, 0.40)) == "unresolved"
    assert summarize.long_arm_reading(entry(-0.1, 0.01, 0.05, 0.20)) == "unresolved"
    one_seed = {
        "gain": {"mas": {"after": {"per_seed": {0: 0.1}}}},
        "mcnemar": {"mas/after/0": {"p_value": 0.3}},
    }
    assert summarize.long_arm_reading(one_seed).startswith("not yet readable")


def test_the_readme_answer_quotes_the_committed_summary():
    """The top-level README's "When does MAS help?" carries the endpoint table of the committed
    results/mas_study/summary.json, line for line, and its unit count: a rerun summary that changes a number
    fails here until the README says the same."""
    import summarize

    summary = json.loads((ROOT / "results" / "mas_study" / "summary.json").read_text(encoding="utf-8"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### When does MAS help?", 1)[1].split("\n## ", 1)[0]
    for line in summarize.answer_table(summary):
        assert line in section, f"README's 'When does MAS help?' lacks: {line}"
    units = len(run.TASKS) * len(run.LAYOUTS) * len(run.CONDITIONS) * len(run.SEEDS)
    assert f"{summary['units_finished']} of {units} units" in section
    assert summary["default_of_mas"] in section
