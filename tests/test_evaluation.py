"""segmask.evaluation: `segmask eval` runs (settings, results files, resume, context overflow, causal sink,
templates) and the old import paths of the names that moved. The scoring itself: tests/test_scoring.py."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from segmask.cli import main
from segmask.eval_config import EvalConfig
from segmask.evaluation import evaluate
from segmask.generation import generate
from segmask.loading import load_model
from segmask.overflow import context_length, fit_prompt
from segmask.results import Journal, wilson_interval
from segmask.scoring import loglik_predictions
from segmask.segments import encode_instruction
from segmask.tasks.commonsense import SUITE, available_tasks, extract_answer, load_task

ANSWERS = ("answer1", "answer2", "answer3", "answer4", "answer5")


# --------------------------------------------------------------------------------------------- settings


@pytest.fixture(scope="module")
def stories(stories_path):
    model, tokenizer, _ = load_model(stories_path)
    return model, tokenizer


def _evaluate(model, tokenizer, data_dir, tasks, **settings):
    """A run through the public API, without a progress bar."""
    return evaluate(model, tokenizer, EvalConfig(data_dir, tasks, **settings), progress=False)


def test_evaluate_rejects_bad_settings(stories, commonsense_dir):
    model, tokenizer = stories
    with pytest.raises(ValueError, match="unknown scoring 'vote'"):
        EvalConfig(commonsense_dir, "boolq", "mas", scoring="vote")
    with pytest.raises(ValueError, match="unknown mask policy 'full'"):
        EvalConfig(commonsense_dir, "boolq", "full", scoring="loglik")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        EvalConfig(commonsense_dir, "boolq", batch_size=0)
    with pytest.raises(ValueError, match="no tasks given"):
        EvalConfig(commonsense_dir, " , ")
    config = EvalConfig(commonsense_dir, "boolq, piqa,boolq", out=commonsense_dir / "r.json")
    assert config.tasks == ("boolq", "piqa") and config.data_dir == str(commonsense_dir)
    assert EvalConfig(commonsense_dir).tasks == SUITE and isinstance(config.out, str)
    with pytest.raises(FileNotFoundError, match="no test file for task 'hellaswag'"):
        _evaluate(model, tokenizer, commonsense_dir, "boolq,hellaswag", scoring="loglik", limit=1)


# -------------------------------------------------------------------------------------- end-to-end runs


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_cli_loglik_every_shared_task(stories_path, commonsense_dir, tmp_path, capsys):
    tasks = available_tasks(commonsense_dir)
    assert {"boolq", "ARC-Easy", "ARC-Challenge", "openbookqa", "social_i_qa"} <= set(tasks)
    out = tmp_path / "run" / "mas.json"
    argv = [
        "eval",
        "--model",
        str(stories_path),
        "--data-dir",
        str(commonsense_dir),
        "--tasks",
        ",".join(tasks),
    ]
    argv += ["--limit", "20", "--scoring", "loglik", "--mask", "mas", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| **average** |" in printed

    results = json.loads(out.read_text())
    assert (results["policy"], results["scoring"], results["limit"]) == ("mas", "loglik", 20)
    assert results["model"] == str(stories_path) and "commit" in results
    assert list(results["tasks"]) == tasks
    rows = _read_jsonl(out.parent / results["predictions"])
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
    argv = [
        "eval",
        "--model",
        str(stories_path),
        "--data-dir",
        str(commonsense_dir),
        "--tasks",
        "boolq,ARC-Easy",
    ]
    argv += [
        "--limit",
        "2",
        "--scoring",
        "generate",
        "--max-new-tokens",
        "12",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["generation"] == {"num_beams": 4, "max_new_tokens": 12}
    rows = _read_jsonl(tmp_path / "gen.predictions.jsonl")
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
    argv = ["eval", "--model", str(stories_path), "--data-dir", str(commonsense_dir), "--tasks", "boolq,piqa"]
    assert main([*argv, "--scoring", "loglik", "--out", str(tmp_path / "r.json")]) == 2
    assert "no test file for task 'piqa'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_repeated_records_are_counted_once_and_reported(stories, commonsense_dir, tmp_path):
    model, tokenizer = stories
    distinct = json.loads((commonsense_dir / "boolq_test.json").read_text())[:3]
    data = tmp_path / "data"
    data.mkdir()
    (data / "boolq_test.json").write_text(json.dumps(distinct + distinct))  # each record twice: 6 rows
    with pytest.warns(UserWarning, match=r"boolq_test.json: 3 repeated records of boolq counted once \(3 "):
        results = _evaluate(model, tokenizer, data, "boolq", scoring="loglik", out=tmp_path / "r.json")
    score = results["tasks"]["boolq"]
    assert (score["n"], score["duplicates"]) == (3, 3)
    assert (score["ci_low"], score["ci_high"]) == pytest.approx(wilson_interval(score["correct"], 3))
    assert [row["index"] for row in _read_jsonl(tmp_path / "r.predictions.jsonl")] == [0, 1, 2]
    # a limit counts distinct records; a record with the same prompt but another answer is its own
    other = {**distinct[0], "answer": "false" if distinct[0]["answer"] == "true" else "true"}
    (data / "boolq_test.json").write_text(json.dumps([distinct[0], distinct[0], other, distinct[1]]))
    task = load_task(data, "boolq", limit=2)
    assert (task.records, task.duplicates) == ((distinct[0], other), 1)


# ---------------------------------------------------------------------------------------------- resume


class _Stop(Exception):
    pass


@pytest.mark.parametrize("scoring", ["loglik", "generate"])
def test_a_stopped_run_resumes_with_the_same_predictions(stories, commonsense_dir, tmp_path, scoring):
    """Stop a run after 3 predictions, run it again: the 3 are kept, only the rest is scored, and the
    results equal an uninterrupted run's; the partial file is gone at the end."""
    model, tokenizer = stories
    settings = dict(policy="mas", scoring=scoring, limit=3, max_new_tokens=6, batch_size=2)
    whole = _evaluate(
        model, tokenizer, commonsense_dir, "boolq,ARC-Easy", out=tmp_path / "a.json", **settings
    )

    out = tmp_path / "b.json"
    _stopped_run(model, tokenizer, commonsense_dir, out, tasks="boolq,ARC-Easy", after=3, **settings)
    partial = tmp_path / "b.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 4 and not out.exists()
    with partial.open("a") as handle:
        handle.write('{"task": "ARC-Easy", "ind')  # a line cut by the stop is dropped

    scored, add = [], Journal.add
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Journal, "add", lambda journal, p: (scored.append(p.index), add(journal, p)))
        resumed = _evaluate(model, tokenizer, commonsense_dir, "boolq,ARC-Easy", out=out, **settings)
    assert len(scored) == 6 - 3  # only what the stopped run had not done
    assert resumed["tasks"] == whole["tasks"] and not partial.exists()
    assert _read_jsonl(tmp_path / "b.predictions.jsonl") == _read_jsonl(tmp_path / "a.predictions.jsonl")


def test_resume_refuses_a_partial_file_of_other_arguments(stories, commonsense_dir, tmp_path):
    model, tokenizer = stories
    out = tmp_path / "r.json"
    partial = tmp_path / "r.partial.jsonl"
    partial.write_text(json.dumps({"model": "other"}) + "\n")
    with pytest.raises(
        ValueError, match=r"r.partial.jsonl holds the predictions of a run with other arguments"
    ):
        _evaluate(model, tokenizer, commonsense_dir, "boolq", scoring="loglik", limit=1, out=out)
    results = _evaluate(  # resume=False starts over
        model,
        tokenizer,
        commonsense_dir,
        "boolq",
        scoring="loglik",
        limit=1,
        out=out,
        resume=False,
    )
    assert results["tasks"]["boolq"]["n"] == 1 and not partial.exists()


def _stopped_run(model, tokenizer, commonsense_dir, out, tasks="boolq", after=1, **settings):
    """A run stopped right after its first ``after`` predictions; returns its journal."""
    add = Journal.add

    def add_then_stop(journal, prediction):
        add(journal, prediction)
        if len(journal.path.read_text().splitlines()) == 1 + after:  # header + predictions
            raise _Stop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Journal, "add", add_then_stop)
        with pytest.raises(_Stop):
            _evaluate(model, tokenizer, commonsense_dir, tasks, out=out, **settings)
    return out.with_name(f"{out.stem}.partial.jsonl")


def test_resume_survives_a_line_cut_inside_a_character(stories, commonsense_dir, tmp_path):
    model, tokenizer = stories
    settings = dict(policy="mas", scoring="loglik", limit=2)
    partial = _stopped_run(model, tokenizer, commonsense_dir, tmp_path / "u.json", **settings)
    with partial.open("ab") as handle:
        handle.write('{"task": "boolq", "prompt": "caf\u00e9'.encode()[:-1])  # stops inside the é
    results = _evaluate(model, tokenizer, commonsense_dir, "boolq", out=tmp_path / "u.json", **settings)
    assert results["tasks"]["boolq"]["n"] == 2 and not partial.exists()


def test_resume_names_a_malformed_row_and_a_changed_task_file(stories, commonsense_dir, tmp_path):
    model, tokenizer = stories
    settings = dict(policy="mas", scoring="loglik", limit=2)
    out = tmp_path / "m.json"
    partial = _stopped_run(model, tokenizer, commonsense_dir, out, **settings)
    header, row = partial.read_text().splitlines()
    partial.write_text(header + "\n" + json.dumps({"task": "boolq"}) + "\n")
    with pytest.raises(ValueError, match=r"m.partial.jsonl:2: not a prediction row"):
        _evaluate(model, tokenizer, commonsense_dir, "boolq", out=out, **settings)
    other = json.loads(row) | {"gold": "not the answer"}
    partial.write_text(header + "\n" + json.dumps(other) + "\n")
    with pytest.raises(ValueError, match=r"boolq record 0 is for another record"):
        _evaluate(model, tokenizer, commonsense_dir, "boolq", out=out, **settings)


def test_loglik_resume_ignores_decoding_settings(stories, commonsense_dir, tmp_path):
    """batch_size, num_beams and max_new_tokens do not change loglik predictions, so they may differ."""
    model, tokenizer = stories
    out = tmp_path / "d.json"
    _stopped_run(
        model, tokenizer, commonsense_dir, out, policy="mas", scoring="loglik", limit=2, batch_size=1
    )
    results = _evaluate(
        model, tokenizer, commonsense_dir, "boolq", scoring="loglik", limit=2, out=out, batch_size=4
    )
    assert results["tasks"]["boolq"]["n"] == 2


# -------------------------------------------------------------------------------------- context overflow


@pytest.fixture
def long_arc(commonsense_dir, tmp_path) -> Path:
    """ARC-Easy records 0, 146 (a 736-token prompt, 757 with its answer: over stories260K's 512) and 1."""
    records = json.loads((commonsense_dir / "ARC-Easy_test.json").read_text())
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "ARC-Easy_test.json").write_text(json.dumps([records[0], records[146], records[1]]))
    return folder


def test_a_prompt_over_the_context_is_refused_by_default(stories, long_arc, tmp_path):
    model, tokenizer = stories
    for scoring, room in (("loglik", 21), ("generate", 32)):
        with pytest.raises(
            ValueError,
            match=rf"ARC-Easy record 1: its prompt of 736 tokens and {room} answer tokens exceed the model's "
            r"context of 512 positions; choose overflow 'truncate' or 'skip'",
        ):
            _evaluate(model, tokenizer, long_arc, "ARC-Easy", scoring=scoring, out=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_truncate_cuts_prompt_content_and_keeps_the_template(stories, long_arc):
    """The cut prompt fits exactly, keeps its first (system) and last (### Response:) tokens and segments."""
    model, tokenizer = stories
    record = load_task(long_arc, "ARC-Easy").records[1]
    prompt = encode_instruction(tokenizer, record, policy="mas", include_answer=False)
    assert (
        fit_prompt(prompt, 21, 1000, "error", "r") is prompt
        and fit_prompt(prompt, 21, 512, "skip", "r") is None
    )
    cut = fit_prompt(prompt, 21, 512, "truncate", "r")
    assert len(cut) == 512 - 21 and context_length(model) == 512
    head, tail = 30, 8
    assert (
        cut.input_ids[:head] == prompt.input_ids[:head] and cut.input_ids[-tail:] == prompt.input_ids[-tail:]
    )
    assert cut.segment_ids[:head] == prompt.segment_ids[:head] and set(cut.segment_ids) == set(
        prompt.segment_ids
    )
    with pytest.raises(ValueError, match="r: cannot truncate to the model's context of 512"):
        fit_prompt(prompt, 500, 512, "truncate", "r")


@pytest.mark.parametrize("scoring", ["loglik", "generate"])
def test_truncate_and_skip_are_counted_in_the_results(stories, long_arc, tmp_path, scoring):
    model, tokenizer = stories
    settings = dict(scoring=scoring, max_new_tokens=8, batch_size=3)
    truncated = _evaluate(
        model, tokenizer, long_arc, "ARC-Easy", overflow="truncate", out=tmp_path / "t.json", **settings
    )
    assert truncated["overflow"] == "truncate"
    score = truncated["tasks"]["ARC-Easy"]
    assert (score["n"], score["truncated"], score["skipped"]) == (3, 1, 0)
    rows = _read_jsonl(tmp_path / "t.predictions.jsonl")
    assert [r.get("truncated") for r in rows] == [None, 736 + (21 if scoring == "loglik" else 8) - 512, None]

    skipped = _evaluate(
        model, tokenizer, long_arc, "ARC-Easy", overflow="skip", out=tmp_path / "s.json", **settings
    )
    score = skipped["tasks"]["ARC-Easy"]
    assert (score["n"], score["truncated"], score["skipped"]) == (2, 0, 1)
    skipped_rows = _read_jsonl(tmp_path / "s.predictions.jsonl")
    assert [r["index"] for r in skipped_rows] == [0, 2]
    assert skipped_rows == [rows[0], rows[2]]  # the records that fit are scored the same under every policy


def test_a_task_with_every_record_over_the_context_is_an_error(stories, long_arc):
    model, tokenizer = stories
    records = json.loads((long_arc / "ARC-Easy_test.json").read_text())
    (long_arc / "ARC-Easy_test.json").write_text(json.dumps(records[1:2]))
    with pytest.raises(
        ValueError, match=r"every record of ARC-Easy is longer than the model's context \(512"
    ):
        _evaluate(model, tokenizer, long_arc, "ARC-Easy", scoring="loglik", overflow="skip")


def test_resume_keeps_a_truncated_prediction_only_under_truncate(stories, long_arc, tmp_path):
    model, tokenizer = stories
    out = tmp_path / "k.json"
    settings = dict(policy="mas", scoring="loglik", tasks="ARC-Easy")
    _stopped_run(model, tokenizer, long_arc, out, after=2, overflow="truncate", **settings)
    with pytest.raises(ValueError, match="ARC-Easy record 1: its prompt of 736 tokens"):
        _evaluate(model, tokenizer, long_arc, "ARC-Easy", scoring="loglik", out=out)  # error: rescored


# ------------------------------------------------------------------------------------------ causal sink

SKY = {
    "instruction": "Is the sky blue?",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}
# stories260K's loglik scores of SKY before causal_sink existed (commit 9ad9b3d): the option off changes none
SKY_SCORES = {
    "mas": {"true": -91.39106750488281, "false": -105.88955688476562},
    "prefix": {"true": -91.02953338623047, "false": -105.28988647460938},
    "causal": {"true": -90.68704223632812, "false": -104.1987075805664},
}


@pytest.fixture
def sky(tmp_path) -> Path:
    """A boolq task of one short record: a 107-token prompt (BOS, system 68, instruction 27, 11 causal)."""
    folder = tmp_path / "sky"
    folder.mkdir()
    (folder / "boolq_test.json").write_text(json.dumps([SKY]))
    return folder


def _evaluated_segments(model, tokenizer, data_dir, **settings) -> tuple[list[int], dict]:
    """The segment ids of the first prompt a run prefills (row 0 of the first call with them) and the
    run's report."""
    seen = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: (
            seen.append(kwargs["segment_ids"][0].tolist()) if "segment_ids" in kwargs else None
        ),
        with_kwargs=True,
    )
    try:
        report = _evaluate(model, tokenizer, data_dir, "boolq", **settings)
    finally:
        handle.remove()
    return seen[0], report


@pytest.mark.parametrize("scoring", ["loglik", "generate"])
def test_the_causal_sink_keeps_token_0_of_an_evaluated_prompt_causal(stories, sky, tmp_path, scoring):
    """stories260K adds a BOS: with the sink it is segment -1 under mas and prefix, the rest as before;
    None is the policy's default (on under mas, off under prefix). The results record the sink applied."""
    model, tokenizer = stories
    expected = {
        ("mas", False): ([0] * 69 + [1] * 27 + [-1] * 11, False),
        ("mas", True): ([-1] + [0] * 68 + [1] * 27 + [-1] * 11, True),
        ("mas", None): ([-1] + [0] * 68 + [1] * 27 + [-1] * 11, True),
        ("prefix", False): ([0] * 96 + [-1] * 11, False),
        ("prefix", True): ([-1] + [0] * 95 + [-1] * 11, True),
        ("prefix", None): ([0] * 96 + [-1] * 11, False),
        ("causal", True): ([-1] * 107, False),
    }
    for (policy, sink), (segments, recorded) in expected.items():
        out = tmp_path / f"{policy}-{sink}.json"
        seen, report = _evaluated_segments(
            model, tokenizer, sky, policy=policy, scoring=scoring, max_new_tokens=2, causal_sink=sink, out=out
        )
        # generate prefills all but the last (causal) prompt token, which decoding then feeds
        assert seen == (segments if scoring == "loglik" else segments[:-1]), (policy, sink)
        assert report["causal_sink"] is recorded and json.loads(out.read_text())["causal_sink"] is recorded


def test_scores_with_the_sink_off_are_unchanged(stories, sky, tmp_path):
    model, tokenizer = stories
    # off: False, or None (the policy's default) under prefix and causal
    for policy, sink in [*((p, False) for p in SKY_SCORES), ("prefix", None), ("causal", None)]:
        out = tmp_path / f"{policy}-{sink}.json"
        report = _evaluate(
            model, tokenizer, sky, "boolq", policy=policy, scoring="loglik", causal_sink=sink, out=out
        )
        assert report["causal_sink"] is False
        [row] = _read_jsonl(tmp_path / f"{policy}-{sink}.predictions.jsonl")
        assert row["scores"] == pytest.approx(SKY_SCORES[policy], abs=1e-4), (policy, sink)
    on = loglik_predictions(model, tokenizer, load_task(sky, "boolq"), "mas", False, causal_sink=True)
    assert abs(on[0].scores["true"] - SKY_SCORES["mas"]["true"]) > 1e-3  # the sink changes mas scores
    default = loglik_predictions(model, tokenizer, load_task(sky, "boolq"), "mas", False)
    assert default[0].scores == pytest.approx(on[0].scores, abs=1e-6)  # and mas has it on by default
    causal = loglik_predictions(model, tokenizer, load_task(sky, "boolq"), "causal", False, causal_sink=True)
    assert causal[0].scores == pytest.approx(SKY_SCORES["causal"], abs=1e-4)  # and nothing under causal
    with pytest.raises(ValueError, match="causal_sink must be true, false or None"):
        EvalConfig(sky, "boolq", causal_sink="yes")


def test_a_journal_of_the_other_sink_is_refused(stories, sky, tmp_path):
    model, tokenizer = stories
    out = tmp_path / "j.json"
    settings = dict(policy="mas", scoring="loglik", tasks="boolq")
    _stopped_run(model, tokenizer, sky, out, after=1, causal_sink=True, **settings)
    with pytest.raises(ValueError, match="'causal_sink': True"):
        _evaluate(model, tokenizer, sky, "boolq", scoring="loglik", out=out, causal_sink=False)


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
        argv = ["eval", "--model", str(model), "--data-dir", str(sky), "--tasks", "boolq", "--scoring"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # overriding a saved value warns
            assert main([*argv, "loglik", "--no-progress", "--out", str(out), *flags]) == 0
        assert json.loads(out.read_text())["causal_sink"] is sink, (model, flags)
    capsys.readouterr()


# ---------------------------------------------------------------------------------- unwritable results


def _eval_argv(stories_path, commonsense_dir, out) -> list[str]:
    return ["eval", "--model", str(stories_path), "--data-dir", str(commonsense_dir), "--tasks", "boolq",
            "--limit", "1", "--scoring", "loglik", "--no-progress", "--out", str(out)]  # fmt: skip


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


# ------------------------------------------------------------------------- the paper's template and extractor


def test_generate_with_the_paper_template_and_either_extractor(stories, sky, tmp_path, monkeypatch):
    """template paper prompts with the official evaluation text and blocks; the extractor reads the same
    generation two ways; the results file records both settings."""
    from segmask.generation import Completion

    model, tokenizer = stories
    prompts = []

    def fake_generate(model, tokenizer, encoded, **kwargs):
        prompts.extend(encoded)
        return [Completion("that is untrue", [])] * len(encoded)

    monkeypatch.setattr("segmask.scoring._generate", fake_generate)
    for extract, prediction in [("official", "true"), ("strict", None)]:
        out = tmp_path / f"{extract}.json"
        # the paper's mask: the BOS in segment 0 (configs/paper_*.yaml set causal_sink: false)
        _evaluate(
            model, tokenizer, sky, "boolq", template="paper", extract=extract, out=out, causal_sink=False
        )
        saved = json.loads(out.read_text())
        assert (saved["template"], saved["extract"]) == ("paper", extract)
        [row] = _read_jsonl(tmp_path / f"{extract}.predictions.jsonl")
        assert row["prediction"] == prediction and row["output"] == "that is untrue"
    # stories260K: segment 0 is alpaca's 69 tokens + '▁' (the space after "request.") + 16 '▁' + 3 '#'
    assert prompts[0].segment_ids == [0] * 89 + [1] * 58 + [-1] * 24
    assert prompts[0].input_ids[86:89] == [38, 38, 38] and prompts[0].input_ids[144:147] == [38, 38, 38]
    default = _evaluate(model, tokenizer, sky, "boolq", scoring="loglik")
    assert default["template"] == "alpaca" and "extract" not in default  # extract: generate scoring only


def test_paper_template_settings_are_checked(sky):
    with pytest.raises(ValueError, match=r"^unknown template 'official'; expected one of alpaca, paper$"):
        EvalConfig(sky, "boolq", template="official")
    with pytest.raises(ValueError, match=r"^unknown extractor 'loose'; expected one of official, strict$"):
        EvalConfig(sky, "boolq", extract="loose")
    with pytest.raises(ValueError, match="loglik scoring needs template alpaca, got 'paper'"):
        EvalConfig(sky, "boolq", scoring="loglik", template="paper")


def test_a_journal_of_another_template_or_extractor_is_refused(stories, sky, tmp_path):
    model, tokenizer = stories
    out = tmp_path / "j.json"
    _stopped_run(model, tokenizer, sky, out, after=1, tasks="boolq", max_new_tokens=1, extract="official")
    with pytest.raises(ValueError, match="'extract': 'official'"):
        _evaluate(model, tokenizer, sky, "boolq", max_new_tokens=1, out=out)


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


def test_a_second_run_on_the_same_out_is_refused(stories, commonsense_dir, tmp_path):
    """Two evaluations on one out would interleave their journal and overwrite each other's results."""
    from segmask.files import exclusive_lock

    model, tokenizer = stories
    out = tmp_path / "runs" / "r.json"
    config = EvalConfig(commonsense_dir, ("boolq",), "mas", "loglik", 2, out)
    out.parent.mkdir()
    with exclusive_lock(tmp_path / "runs" / "r.lock", "another evaluation"):
        with pytest.raises(ValueError, match=r"out .*r\.json is in use by another run"):
            evaluate(model, tokenizer, config, progress=False)
        assert not out.exists()
    assert evaluate(model, tokenizer, config, progress=False)["tasks"]["boolq"]["n"] == 2
    assert not (tmp_path / "runs" / "r.lock").exists()  # released
