"""File safety, one check per command that writes files: no output path may be one of the command's inputs
(:func:`segmask.files.check_outputs`), and ``train --overwrite`` never deletes its own data. Each refusal is
one line on stderr, exit 2, with every input byte for byte as it was.

``generate``, ``chat`` and ``serve`` write no files (stdout and HTTP only); ``lm-eval`` hands its
arguments to lm_eval's own command line."""

from __future__ import annotations

import json
from pathlib import Path

from segmask.cli import main
from segmask.results import Prediction, score_predictions, write_results


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))
    }


def one_error_line(capsys, command: str, message: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith(f"segmask {command}: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def results_file(path: Path) -> Path:
    predictions = [Prediction("boolq", index, "p", "o", "true", "true") for index in range(2)]
    scores = score_predictions(predictions)
    results = {"model": "m", "policy": "mas", "scoring": "loglik", "limit": None, "commit": None,
               "tasks": {task: vars(score) for task, score in scores.items()}}  # fmt: skip
    write_results(results, predictions, path)
    return path


def test_compare_refuses_to_write_its_table_over_an_input(tmp_path, capsys):
    """The probe: `compare a.json b.json --out-md a.json` replaced a.json by the markdown table, exit 0."""
    a, b = results_file(tmp_path / "a.json"), results_file(tmp_path / "b.json")
    before = snapshot(tmp_path)
    assert main(["compare", str(a), str(b), "--out-md", str(a)]) == 2
    one_error_line(capsys, "compare", f"--out-md {a} is also an input; refusing to overwrite it")
    assert main(["compare", str(a), str(b), "--out-png", str(tmp_path / "b.predictions.jsonl")]) == 2
    one_error_line(capsys, "compare", "b.predictions.jsonl is also an input")
    assert snapshot(tmp_path) == before


def test_viz_refuses_to_draw_over_its_messages(stories_chat, tmp_path, capsys):
    out = tmp_path / "viz"
    out.mkdir()
    messages = out / "mask.png"  # a JSON file, whatever its name: viz would write its mask drawing here
    messages.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    before = snapshot(tmp_path)
    argv = ["viz", "--model", str(stories_chat), "--messages", str(messages), "--out", str(out)]
    assert main(argv) == 2
    one_error_line(capsys, "viz", f"--out {messages} is also an input; refusing to overwrite it")
    assert snapshot(tmp_path) == before


def test_eval_refuses_results_written_over_a_task_file(stories_path, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    task = data / "boolq_test.json"
    task.write_text(json.dumps([{"instruction": "q", "input": "", "output": "true", "answer": "true"}]))
    before = snapshot(tmp_path)
    argv = ["eval", "--model", str(stories_path), "--data-dir", str(data), "--tasks", "boolq"]
    assert main([*argv, "--out", str(task)]) == 2
    one_error_line(capsys, "eval", f"--out {task} is also an input; refusing to overwrite it")
    assert snapshot(tmp_path) == before


def test_train_overwrite_refuses_data_inside_its_output(stories_path, tmp_path, capsys):
    """The probe: a run folder holding mydata.json (passed as --data) and NOTES.txt lost both to --overwrite."""
    run = tmp_path / "run"
    run.mkdir()
    data = run / "mydata.json"
    data.write_text(json.dumps([{"instruction": "What did Tom see?", "input": "", "output": "A cat."}] * 4))
    (run / "NOTES.txt").write_text("precious")
    saved = {"model": str(stories_path), "data": [str(data)], "mask": "mas"}
    (run / "train_config.json").write_text(json.dumps(saved))  # an earlier run's
    before = snapshot(tmp_path)
    argv = ["train", "--model", str(stories_path), "--data", str(data), "--output", str(run), "--overwrite"]
    assert main([*argv, "--max-steps", "1", "--cutoff-len", "128"]) == 2
    one_error_line(capsys, "train", f"output {run} holds the input {data}; keep inputs outside it")
    assert snapshot(tmp_path) == before
