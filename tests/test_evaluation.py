"""segmask.evaluation: evaluation runs (settings, results files, resume, context overflow, causal sink,
templates). The scoring itself: tests/test_scoring.py; the `segmask eval` command: tests/cli/test_eval.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_jsonl

from segmask.eval_config import EvalConfig
from segmask.evaluation import evaluate
from segmask.overflow import context_length, fit_prompt
from segmask.results import Journal, wilson_interval
from segmask.scoring import loglik_predictions
from segmask.segments import encode_instruction
from segmask.tasks.commonsense import load_task

# --------------------------------------------------------------------------------------------- settings


def _evaluate(model, tokenizer, data_dir, tasks, **settings):
    """A run through the public API, without a progress bar."""
    return evaluate(model, tokenizer, EvalConfig(data_dir, tasks, **settings), progress=False)


def test_evaluate_names_a_missing_task_file(stories, commonsense_dir):
    """(The settings EvalConfig refuses on construction: tests/test_eval_config.py.)"""
    model, tokenizer = stories
    with pytest.raises(FileNotFoundError, match="no test file for task 'hellaswag'"):
        _evaluate(model, tokenizer, commonsense_dir, "boolq,hellaswag", scoring="loglik", limit=1)


# -------------------------------------------------------------------------------------- end-to-end runs


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
    assert [row["index"] for row in read_jsonl(tmp_path / "r.predictions.jsonl")] == [0, 1, 2]
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
    assert read_jsonl(tmp_path / "b.predictions.jsonl") == read_jsonl(tmp_path / "a.predictions.jsonl")


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
    rows = read_jsonl(tmp_path / "t.predictions.jsonl")
    assert [r.get("truncated") for r in rows] == [None, 736 + (21 if scoring == "loglik" else 8) - 512, None]

    skipped = _evaluate(
        model, tokenizer, long_arc, "ARC-Easy", overflow="skip", out=tmp_path / "s.json", **settings
    )
    score = skipped["tasks"]["ARC-Easy"]
    assert (score["n"], score["truncated"], score["skipped"]) == (2, 0, 1)
    skipped_rows = read_jsonl(tmp_path / "s.predictions.jsonl")
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

# stories260K's loglik scores of SKY before causal_sink existed (commit 9ad9b3d): the option off changes none
SKY_SCORES = {
    "mas": {"true": -91.39106750488281, "false": -105.88955688476562},
    "prefix": {"true": -91.02953338623047, "false": -105.28988647460938},
    "causal": {"true": -90.68704223632812, "false": -104.1987075805664},
}


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
        [row] = read_jsonl(tmp_path / f"{policy}-{sink}.predictions.jsonl")
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
        [row] = read_jsonl(tmp_path / f"{extract}.predictions.jsonl")
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
