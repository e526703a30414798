"""``segmask eval``: the command's flags, results files and errors, end to end (a run's scoring, resume and
overflow through the library: tests/test_evaluation.py)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from conftest import PLAIN_ROLES, read_jsonl

import segmask.loading
from segmask.cli import main
from segmask.generation import generate
from segmask.loading import load
from segmask.results import wilson_interval
from segmask.tasks.commonsense import available_tasks, extract_answer, load_task

ANSWERS = ("answer1", "answer2", "answer3", "answer4", "answer5")


def eval_argv(model, data_dir, tasks: str, *flags: str) -> list[str]:
    """``segmask eval`` over ``tasks`` of ``data_dir`` with ``model``, then ``flags``."""
    return ["eval", "--model", str(model), "--data-dir", str(data_dir), "--tasks", tasks, *flags]


def test_eval_cli_loglik_every_shared_task(stories_path, commonsense_dir, tmp_path, capsys):
    tasks = available_tasks(commonsense_dir)
    assert {"boolq", "ARC-Easy", "ARC-Challenge", "openbookqa", "social_i_qa"} <= set(tasks)
    out = tmp_path / "run" / "mas.json"
    argv = eval_argv(stories_path, commonsense_dir, ",".join(tasks), "--limit", "20", "--scoring", "loglik")
    argv += ["--mask", "mas", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| **average** |" in printed

    results = json.loads(out.read_text())
    assert (results["policy"], results["scoring"], results["limit"]) == ("mas", "loglik", 20)
    assert results["model"] == str(stories_path) and "commit" in results
    assert list(results["tasks"]) == tasks
    rows = read_jsonl(out.parent / results["predictions"])
    assert len(rows) == 20 * len(tasks)
    for task in tasks:
        gold = [r["answer"] for r in json.loads(Path(results["tasks"][task]["file"]).read_text())[:20]]
        mine = [r for r in rows if r["task"] == task]
        assert [r["index"] for r in mine] == list(range(20)) and [r["gold"] for r in mine] == gold
        for row in mine:
            assert row["prediction"] == max(row["scores"], key=row["scores"].get)
            assert row["correct"] == (row["prediction"] == row["gold"])
        score = results["tasks"][task]
        correct = sum(r["correct"] for r in mine)
        assert (score["n"], score["correct"], score["unparseable"]) == (20, correct, 0)
        assert score["accuracy"] == correct / 20
        assert (score["ci_low"], score["ci_high"]) == pytest.approx(wilson_interval(correct, 20))
    average = sum(s["accuracy"] for s in results["tasks"].values()) / len(tasks)
    assert results["average"] == pytest.approx(average)


def test_eval_cli_generate(stories, stories_path, commonsense_dir, tmp_path):
    out = tmp_path / "gen.json"
    argv = eval_argv(stories_path, commonsense_dir, "boolq,ARC-Easy", "--limit", "2", "--scoring", "generate")
    argv += ["--max-new-tokens", "12", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["generation"] == {"num_beams": 4, "max_new_tokens": 12}
    rows = read_jsonl(tmp_path / "gen.predictions.jsonl")
    assert len(rows) == 4
    model, tokenizer = stories
    task = load_task(commonsense_dir, "boolq", limit=2)
    expected = generate(
        model, tokenizer, list(task.records), "mas", num_beams=4, do_sample=False, max_new_tokens=12
    )
    assert [r["output"] for r in rows[:2]] == [c.text for c in expected]
    for row in rows:
        labels = ("true", "false") if row["task"] == "boolq" else ANSWERS
        assert row["prediction"] == extract_answer(row["output"], labels)
    for name, score in results["tasks"].items():
        assert score["unparseable"] == sum(r["prediction"] is None for r in rows if r["task"] == name)


def test_eval_cli_names_a_missing_task(stories_path, commonsense_dir, tmp_path, capsys):
    argv = eval_argv(stories_path, commonsense_dir, "boolq,piqa")
    assert main([*argv, "--scoring", "loglik", "--out", str(tmp_path / "r.json")]) == 2
    assert "no test file for task 'piqa'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_eval_cli_causal_sink_flag_and_the_runs_saved_value(stories_path, sky, tmp_path, capsys):
    """--causal-sink / --no-causal-sink; absent, a run folder's saved causal_sink, else the policy's
    default (on under mas, off under prefix)."""
    run = tmp_path / "run"
    shutil.copytree(stories_path, run)
    info = {"policy": "mas", "base_model": str(stories_path), "adapter": False, "causal_sink": True}
    (run / "segmask.json").write_text(json.dumps(info))
    for model, flags, sink in [
        (stories_path, [], True),
        (stories_path, ["--mask", "prefix"], False),
        (stories_path, ["--no-causal-sink"], False),
        (stories_path, ["--mask", "prefix", "--causal-sink"], True),
        (run, [], True),
        (run, ["--no-causal-sink"], False),
    ]:
        out = tmp_path / f"{model.name}{''.join(flags)}.json"
        argv = eval_argv(model, sky, "boolq", "--scoring")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # overriding a saved value warns
            assert main([*argv, "loglik", "--no-progress", "--out", str(out), *flags]) == 0
        assert json.loads(out.read_text())["causal_sink"] is sink, (model, flags)
    capsys.readouterr()


# ---------------------------------------------------------------------------------- unwritable results


def _eval_argv(stories_path, commonsense_dir, out) -> list[str]:
    flags = ("--limit", "1", "--scoring", "loglik", "--no-progress", "--out", str(out))
    return eval_argv(stories_path, commonsense_dir, "boolq", *flags)


def test_eval_out_that_cannot_be_written_exits_2_with_one_line(
    stories_path, commonsense_dir, tmp_path, capsys
):
    """--out a folder, or below a file: a path whose parent is a regular file stands in for a read-only
    folder, which root (the test user here) may write to anyway."""
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / "results").mkdir()
    cases = [
        ("results", "is a folder; give the results file's path"),
        ("notes.txt/r.json", "Not a directory"),
    ]
    for where, message in cases:
        before = sorted(tmp_path.rglob("*"))
        assert main(_eval_argv(stories_path, commonsense_dir, tmp_path / where)) == 2
        error = capsys.readouterr().err
        assert (
            error.startswith("segmask eval: error: ") and message in error and str(tmp_path / where) in error
        )
        assert error.count("\n") == 1 and sorted(tmp_path.rglob("*")) == before


def test_eval_out_in_a_read_only_folder_exits_2(stories_path, commonsense_dir, tmp_path, capsys):
    """chmod a-w; skipped where the user (root) writes to it anyway."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        try:
            (folder / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("this user writes to read-only folders (root)")
        assert main(_eval_argv(stories_path, commonsense_dir, folder / "r.json")) == 2
        assert "cannot write results to" in capsys.readouterr().err and not list(folder.iterdir())
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------------ chat templates


def test_eval_cli_template_and_extract_flags(stories_path, sky, tmp_path, capsys):
    """--template (absent: the run's saved template, else alpaca) and --extract; bad values exit 2."""
    run = tmp_path / "run"
    shutil.copytree(stories_path, run)
    info = {"policy": "mas", "base_model": str(stories_path), "adapter": False, "template": "paper"}
    (run / "segmask.json").write_text(json.dumps(info))
    argv = ["eval", "--data-dir", str(sky), "--tasks", "boolq", "--max-new-tokens", "1", "--greedy"]
    for model, flags, template, extract in [
        (stories_path, [], "alpaca", "strict"),
        (stories_path, ["--template", "paper", "--extract", "official"], "paper", "official"),
        (run, [], "paper", "strict"),
    ]:
        out = tmp_path / f"{model.name}{len(flags)}.json"
        assert main([*argv, "--model", str(model), "--no-progress", "--out", str(out), *flags]) == 0
        saved = json.loads(out.read_text())
        assert (saved["template"], saved["extract"]) == (template, extract), (model, flags)
    capsys.readouterr()
    out = str(tmp_path / "bad.json")
    for flags in (["--extract", "loose"], ["--template", "official"]):
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--model", str(stories_path), "--out", out, *flags])
        assert stop.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert (
        main(
            [*argv, "--model", str(stories_path), "--out", out, "--scoring", "loglik", "--template", "paper"]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert (
        error.startswith("segmask eval: error: loglik scoring needs template alpaca")
        and error.count("\n") == 1
    )


def test_eval_refuses_a_bad_template_in_one_line(stories_path, commonsense_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = eval_argv(stories_path, commonsense_dir, "boolq")
    argv += ["--out", str(out), "--no-progress", "--chat-template", "{% if %}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("segmask eval: error: the inline chat template is not valid Jinja")
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_eval_loads_the_model_with_the_chat_template(stories_path, commonsense_dir, tmp_path, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        loaded = load(*args, **kwargs)
        seen.append(loaded.tokenizer.chat_template)
        return loaded

    monkeypatch.setattr(segmask.loading, "load", spy)
    argv = eval_argv(stories_path, commonsense_dir, "boolq")
    argv += ["--limit", "1", "--scoring", "loglik", "--out", str(tmp_path / "r.json"), "--no-progress"]
    assert main([*argv, "--chat-template", str(PLAIN_ROLES)]) == 0
    assert seen == [PLAIN_ROLES.read_text()]
