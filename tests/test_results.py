"""segmask.results: accuracy with Wilson intervals, unparseable answers, the unweighted average, the results
dict and files, and the old import path through segmask.evaluation."""

from __future__ import annotations

import json

import pytest
from scipy.stats import binomtest

from segmask.results import (
    Journal,
    Prediction,
    average_accuracy,
    check_out,
    predictions_path,
    run_results,
    score_predictions,
    wilson_interval,
    write_results,
)


def test_wilson_interval_matches_scipy():
    for correct, n in [(0, 5), (3, 4), (12, 20), (20, 20), (731, 1172)]:
        expected = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = wilson_interval(correct, n)
        assert low == pytest.approx(expected.low, abs=1e-12)
        assert high == pytest.approx(expected.high, abs=1e-12)
    with pytest.raises(ValueError, match="at least one trial"):
        wilson_interval(0, 0)


def test_accuracy_unparseable_and_unweighted_average():
    def p(task, index, prediction, gold):
        return Prediction(task, index, "prompt", "output", prediction, gold)

    predictions = [
        p("boolq", 0, "true", "true"),
        p("boolq", 1, "false", "true"),
        p("boolq", 2, None, "false"),  # unparseable counts as wrong
        p("boolq", 3, "false", "false"),
        p("piqa", 0, "solution1", "solution1"),
        p("piqa", 1, None, "solution2"),
    ]
    scores = score_predictions(predictions)
    assert list(scores) == ["boolq", "piqa"]
    boolq, piqa = scores["boolq"], scores["piqa"]
    assert (boolq.n, boolq.correct, boolq.unparseable, boolq.accuracy) == (4, 2, 1, 0.5)
    assert (piqa.n, piqa.correct, piqa.unparseable, piqa.accuracy) == (2, 1, 1, 0.5)
    assert (boolq.ci_low, boolq.ci_high) == wilson_interval(2, 4)
    assert boolq.ci_low < boolq.accuracy < boolq.ci_high
    # unweighted: each task counts once; pooled over records it would be 3/6 here too, so change one
    scores = score_predictions(predictions[:4] + [p("piqa", 0, "solution1", "solution1")])
    assert average_accuracy(scores) == pytest.approx((0.5 + 1.0) / 2)


def test_run_results_and_files(tmp_path):
    predictions = [
        Prediction("b", 0, "p", "o", "x", "x"),
        Prediction("a", 0, "p", "o", "y", "x", {"x": -2.0, "y": -1.0}),
    ]
    report = run_results(predictions, {"model": "m", "policy": "mas"}, {"b": "b.json", "a": "a.json"})
    assert list(report) == ["model", "policy", "commit", "tasks", "average"]
    assert list(report["tasks"]) == ["b", "a"]  # order of first appearance
    assert report["tasks"]["a"]["file"] == "a.json" and report["tasks"]["b"]["accuracy"] == 1.0
    assert report["average"] == 0.5
    assert "file" not in run_results(predictions, {})["tasks"]["a"]
    out = tmp_path / "runs" / "r.json"
    jsonl = write_results(report, predictions, out)
    assert jsonl == predictions_path(out) == tmp_path / "runs" / "r.predictions.jsonl"
    assert json.loads(out.read_text())["predictions"] == "r.predictions.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [row["correct"] for row in rows] == [True, False] and rows[1]["scores"] == {"x": -2.0, "y": -1.0}


def test_check_out_refuses_what_cannot_be_written_and_leaves_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    check_out(tmp_path / "new" / "deeper" / "r.json")  # folders a run creates: fine, none made yet
    with pytest.raises(ValueError, match=r"out .* is a folder; give the results file's path"):
        check_out(tmp_path)
    with pytest.raises(ValueError, match=r"cannot write results to .*notes\.txt/r\.json: Not a directory"):
        check_out(tmp_path / "notes.txt" / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_truncated_prediction_says_so_and_an_empty_journal_leaves_no_file(tmp_path):
    plain, cut = Prediction("t", 0, "p", "o", "x", "x"), Prediction("t", 1, "p", "o", "x", "x", truncated=7)
    assert "truncated" not in plain.to_json() and cut.to_json()["truncated"] == 7
    path = tmp_path / "r.partial.jsonl"
    Journal(path, {"run": 1}).close()  # refused before its first prediction
    assert not path.exists()
    journal = Journal(path, {"run": 1})
    journal.add(cut)
    journal.close()
    assert Journal(path, {"run": 1}).done == {("t", 1): cut}
