"""``segmask compare``: the table on stdout, the chart file, and one error line with exit 2 (the
comparison itself: tests/test_compare.py)."""

from __future__ import annotations

from conftest import write_scored_run

from segmask.cli import main


def test_compare_prints_the_table_writes_the_chart_and_exits_2_on_a_missing_file(tmp_path, capsys):
    base = write_scored_run(tmp_path / "a.json", {"boolq": [True, False]})
    other = write_scored_run(tmp_path / "b.json", {"boolq": [True, True]})
    png = tmp_path / "c.png"
    assert main(["compare", str(base), str(other), "--out-png", str(png)]) == 0
    assert "| boolq (n=2) |" in capsys.readouterr().out
    assert png.stat().st_size > 0
    assert main(["compare", str(tmp_path / "nope.json")]) == 2
