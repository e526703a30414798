"""segmask.compare: McNemar tests, the markdown table, the bar chart (the command: tests/cli/test_compare.py)."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
from conftest import write_scored_run

from segmask.cli import main
from segmask.compare import compare_runs, load_run, mcnemar, paired_test


def test_mcnemar_exact_p_values():
    # 10 discordant records, all in favour of b: two-sided p = 2 * 0.5**10
    a = [False] * 10 + [True] * 5
    b = [True] * 10 + [True] * 5
    test = mcnemar(a, b)
    assert (test.n, test.only_a, test.only_b) == (15, 0, 10)
    assert test.p_value == pytest.approx(2 * 0.5**10)
    # 1 vs 2 discordant: P(X <= 1) + P(X >= 2) for Binomial(3, 1/2) covers everything
    assert mcnemar([True, False, False, True], [False, True, True, True]).p_value == pytest.approx(1.0)
    # no discordant pair: nothing to see
    assert mcnemar([True, False], [True, False]).p_value == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar([True], [True, False])


def test_table_rows_columns_and_paired_tests(tmp_path):
    base = write_scored_run(
        tmp_path / "causal.json", {"boolq": [False] * 12 + [True] * 8, "piqa": [True, False]}
    )
    other = write_scored_run(tmp_path / "mas.json", {"boolq": [True] * 12 + [True] * 8, "piqa": [True, True]})
    md_path, png_path = tmp_path / "out" / "cmp.md", tmp_path / "out" / "cmp.png"
    markdown = compare_runs([base, other], out_md=md_path, out_png=png_path)

    lines = markdown.splitlines()
    assert lines[0] == "| task | causal | mas | mas vs causal |"
    assert lines[2].startswith("| boolq (n=20) | 40.0 [")
    assert lines[3].startswith("| piqa (n=2) | 50.0 [")
    # boolq: 12 records right only under mas, none only under causal
    assert f"+60.0, p={2 * 0.5**12:.3g}* (12/0 of 20)" in lines[2]
    assert "+50.0, p=1 (1/0 of 2)" in lines[3]
    # average last, unweighted: (0.4 + 0.5) / 2 and (1 + 1) / 2
    assert (
        lines[4]
        == f"| **average** | **45.0** | **100.0** | +55.0, p={2 * 0.5**13:.3g}* (13/0 of 22) pooled |"
    )
    assert md_path.read_text() == markdown

    image = matplotlib.image.imread(png_path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_only_shared_records_are_paired(tmp_path):
    base = write_scored_run(tmp_path / "a.json", {"boolq": [False, False, True, True]})
    other = write_scored_run(tmp_path / "b.json", {"boolq": [True, True]})  # e.g. a smaller --limit
    assert "(2/0 of 2)" in compare_runs([base, other])


def test_average_is_over_the_tasks_every_run_scored(tmp_path):
    # a scored piqa too (all right); b did not: the averages compare boolq with boolq, 50.0 both
    base = write_scored_run(tmp_path / "a.json", {"boolq": [True, False], "piqa": [True, True]})
    other = write_scored_run(tmp_path / "b.json", {"boolq": [False, True]})
    lines = compare_runs([base, other]).splitlines()
    assert lines[2].startswith("| boolq (n=2) | 50.0 [")
    assert not any(line.startswith("| piqa") for line in lines)
    assert lines[3] == "| **average** | **50.0** | **50.0** | +0.0, p=1 (1/1 of 2) pooled |"
    assert "- dropped task piqa: only in a" in lines


def test_different_limits_compare_the_shared_records(tmp_path):
    # a: --limit 5, 4 of 5 right (80.0); b: 20 records, 15 right (75.0), its first 5 as a's
    first = [True, True, False, True, True]
    base = write_scored_run(tmp_path / "a.json", {"boolq": first})
    other = write_scored_run(tmp_path / "b.json", {"boolq": first + [True] * 11 + [False] * 4})
    lines = compare_runs([base, other]).splitlines()
    assert lines[2].startswith("| boolq (n=5) | 80.0 [")
    assert lines[2].split("|")[3].startswith(" 80.0 [") and "+0.0, p=1 (0/0 of 5)" in lines[2]
    assert lines[3].startswith("| **average** | **80.0** | **80.0** | +0.0")
    assert "- dropped 15 records of task boolq only in b" in lines


def test_sizes_that_differ_without_predictions_are_not_compared(tmp_path):
    base = write_scored_run(tmp_path / "a.json", {"boolq": [True] * 4, "piqa": [True, False]})
    other = write_scored_run(tmp_path / "b.json", {"boolq": [True, False], "piqa": [False, False]})
    (tmp_path / "b.predictions.jsonl").unlink()
    lines = compare_runs([base, other]).splitlines()
    assert not any(line.startswith("| boolq") for line in lines)
    assert "- dropped task boolq: 4 in a, 2 in b, and no predictions of b to match the records by" in lines
    assert lines[3] == "| **average** | **50.0** | **0.0** | -50.0 (no predictions) |"


def test_mixed_scoring_is_refused(tmp_path, capsys):
    base = write_scored_run(tmp_path / "a.json", {"boolq": [True, False]}, scoring="generate")
    other = write_scored_run(tmp_path / "b.json", {"boolq": [True, True]}, scoring="loglik")
    with pytest.raises(ValueError, match="scored differently .*a.json: generate, .*b.json: loglik"):
        compare_runs([base, other])
    assert main(["compare", str(base), str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segmask compare: error: the runs were scored differently") and err.count("\n") == 1


def test_different_gold_labels_are_refused(tmp_path):
    base = write_scored_run(tmp_path / "a.json", {"boolq": [True, True]}, {"boolq": ["true", "false"]})
    other = write_scored_run(tmp_path / "b.json", {"boolq": [True, True]}, {"boolq": ["true", "true"]})
    with pytest.raises(ValueError, match="record 1: gold 'false'"):
        compare_runs([base, other])


def test_run_without_predictions_still_tabulates(tmp_path):
    base = write_scored_run(tmp_path / "a.json", {"boolq": [True, False]})
    other = write_scored_run(tmp_path / "b.json", {"boolq": [True, True]})
    (tmp_path / "b.predictions.jsonl").unlink()
    assert load_run(other).records is None
    assert "+50.0 (no predictions)" in compare_runs([base, other])


def test_bad_results_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "m"}))
    with pytest.raises(ValueError, match="bad.json: not a segmask results file"):
        load_run(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_run(tmp_path / "missing.json")


def test_paired_test_refuses_a_string_of_tasks(tmp_path):
    run = load_run(write_scored_run(tmp_path / "a.json", {"boolq": [True, False]}))
    with pytest.raises(TypeError, match="tasks must be a list of task names, got the string 'boolq'"):
        paired_test(run, run, "boolq")


def test_over_seeds_mean_and_t_interval():
    from segmask.compare import over_seeds

    # mean 0.02, sd 0.01, n 3: half-width t(0.975, 2) * 0.01 / sqrt(3) = 4.3027 * 0.005774 = 0.024841
    summary = over_seeds([0.01, 0.02, 0.03])
    assert summary["n_seeds"] == 3
    assert summary["mean"] == pytest.approx(0.02)
    assert summary["ci_low"] == pytest.approx(0.02 - 0.024841, abs=1e-6)
    assert summary["ci_high"] == pytest.approx(0.02 + 0.024841, abs=1e-6)
    assert over_seeds([0.5]) == {"n_seeds": 1, "mean": 0.5, "ci_low": None, "ci_high": None}
    assert over_seeds([])["mean"] is None


def test_paired_t_on_seed_differences():
    from segmask.compare import p_text, paired_t

    # t = 0.02 / (0.01 / sqrt(3)) = 3.4641 with 2 degrees of freedom: two-sided p = 0.07418
    test = paired_t([0.01, 0.02, 0.03])
    assert test["t"] == pytest.approx(3.4641, abs=1e-4)
    assert test["p_value"] == pytest.approx(0.07418, abs=1e-5)
    assert p_text(test, 3) == "0.0742 (df=2)"
    # a negative effect gives a negative t and the same p
    assert paired_t([-0.01, -0.02, -0.03])["t"] == pytest.approx(-3.4641, abs=1e-4)
    # identical differences (up to float rounding of k/n accuracies): no variance, so no p-value
    same = paired_t([0.1 - 0.09, 0.2 - 0.19, 0.01])
    assert same["p_value"] is None and "no variance" in same["undefined"]
    assert p_text(same, 3).startswith("undefined (n=3")
    assert p_text(paired_t([0.01]), 1) == "– (needs 2 seeds)"


def test_interval_text_in_percent():
    from segmask.compare import interval_text, over_seeds, paired_t, percent_text

    assert percent_text(0.1234) == "12.3"
    assert percent_text(0.1234, signed=True) == "+12.3"
    assert percent_text(-0.005, signed=True) == "-0.5"
    assert percent_text(None) == "–"
    # mean 0.02, half-width 0.024841 (see above)
    assert interval_text(over_seeds([0.01, 0.02, 0.03])) == "2.0 [-0.5, 4.5]"
    assert interval_text(paired_t([0.01, 0.02, 0.03]), signed=True) == "+2.0 [-0.5, +4.5]"
    assert interval_text(over_seeds([0.5])) == "50.0"  # one seed: no interval
    assert interval_text(over_seeds([])) == "–"


def test_compare_runs_refuses_to_write_over_an_input(tmp_path):
    """The library checks its outputs as the CLI does: a table written over a results file (or its
    predictions) would destroy a run."""
    base = write_scored_run(tmp_path / "causal.json", {"boolq": [True, False]})
    other = write_scored_run(tmp_path / "mas.json", {"boolq": [True, True]})
    before = base.read_text()
    with pytest.raises(ValueError, match="out_md .* is also an input"):
        compare_runs([base, other], out_md=base)
    with pytest.raises(ValueError, match="out_md and out_png are the same file"):
        compare_runs([base, other], out_md=tmp_path / "x", out_png=tmp_path / "x")
    assert base.read_text() == before
