"""`segmask.runs`: segmask.json as a typed record (old files still read), the one settings rule, and every
command resolving through it, reading segmask.json once."""

from __future__ import annotations

import io
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from segmask import runs
from segmask.cli import main
from segmask.runs import RUN_FILE, Run, Settings, read_run, resolve_settings, write_run

# a segmask.json as `segmask train` has written it since issue 20 (keys in its order)
WRITTEN = {
    "policy": "prefix",
    "causal_sink": True,
    "template": "paper",
    "base_model": "/models/base",
    "adapter": True,
    "train_config": {"model": "/models/base", "policy": "prefix"},
    "data_fingerprint": "abc123",
    "segmask_version": "0.1.0",
}


def test_a_run_round_trips_in_the_keys_training_has_always_written(tmp_path):
    run = Run(**WRITTEN)
    write_run(tmp_path, run)
    text = (tmp_path / RUN_FILE).read_text()
    assert list(json.loads(text)) == list(WRITTEN) and json.loads(text) == WRITTEN
    assert read_run(tmp_path) == run


def test_older_run_files_read_with_the_defaults_of_their_time(tmp_path):
    (tmp_path / RUN_FILE).write_text(json.dumps({"policy": "mas", "base_model": "b", "future_key": 1}))
    assert read_run(tmp_path) == Run(policy="mas", base_model="b", adapter=False, causal_sink=False)
    assert read_run(tmp_path / "nothing") is None and read_run(tmp_path / RUN_FILE) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "is not valid JSON"),
        ("[]", "must hold a JSON object"),
        ('{"policy": "mas"}', "lacks base_model"),
        ('{"policy": "diagonal", "base_model": "b"}', "unknown mask policy 'diagonal'"),
        ('{"policy": "mas", "base_model": "b", "adapter": "yes"}', "'adapter' must be true or false"),
    ],
)
def test_a_bad_run_file_is_one_value_error(tmp_path, text, message):
    (tmp_path / RUN_FILE).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_run(tmp_path)


SAVED = Run(policy="prefix", base_model="b", causal_sink=True, template="paper")


@pytest.mark.parametrize(
    ("run", "asked", "expected"),
    [
        (None, {}, Settings("mas", None, "alpaca")),  # no run: None is each prompt's policy default
        (None, {"policy": "prefix", "causal_sink": False}, Settings("prefix", False, "alpaca")),
        (SAVED, {}, Settings("prefix", True, "paper")),
        (Run(policy="mas", base_model="b", template="chat_template"), {}, Settings("mas", False, "alpaca")),
        (Run(policy="mas", base_model="b", template="alpaca+chat_template"), {}, Settings("mas", False, "alpaca")),
        (SAVED, {"policy": "prefix", "causal_sink": True, "template": "paper"}, Settings("prefix", True, "paper")),
    ],
)  # fmt: skip
def test_settings_as_asked_else_as_saved_else_the_default(run, asked, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_settings(run, **asked) == expected


def test_asking_for_other_settings_than_the_run_saved_warns_for_each():
    with pytest.warns(UserWarning) as caught:
        settings = resolve_settings(SAVED, policy="mas", causal_sink=False, template="alpaca")
    assert settings == Settings("mas", False, "alpaca")
    assert [str(w.message) for w in caught] == [
        "this model was trained with mask policy 'prefix'; running it with 'mas' instead. "
        "Evaluating with a mask other than the one trained with hurts accuracy.",
        "this model was trained with causal_sink=True; running it with causal_sink=False instead",
        "this model was trained with template 'paper'; prompting it with 'alpaca' instead",
    ]
    for bad, message in [
        ({"policy": "full"}, "unknown mask policy"),
        ({"causal_sink": "yes"}, "causal_sink must be true, false or None"),
        ({"template": "official"}, "unknown template"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_settings(None, **bad)


@pytest.fixture
def saved_run(stories_path, tmp_path) -> Path:
    """stories260K as a full-weights run folder trained under prefix, with the sink on and the paper template."""
    run = tmp_path / "run"
    shutil.copytree(stories_path, run)
    write_run(run, Run(policy="prefix", base_model=str(stories_path), causal_sink=True, template="paper"))
    return run


def count_reads(monkeypatch) -> list[str]:
    """Every read of a segmask.json from now on."""
    reads, read_text = [], Path.read_text

    def counted(path: Path, *args, **kwargs):
        if path.name == RUN_FILE:
            reads.append(str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    return reads


def test_generate_reads_the_run_file_once(saved_run, monkeypatch, capsys):
    reads = count_reads(monkeypatch)
    argv = ["generate", "--model", str(saved_run), "--prompt", "Once", "--max-new-tokens", "2", "--json"]
    assert main(argv) == 0
    assert len(reads) == 1, reads  # three before segmask.runs (load_model, the sink, the template)


def test_every_command_that_loads_a_model_resolves_through_one_function(
    saved_run, commonsense_dir, tmp_path, monkeypatch, capsys
):
    import segmask.serving.app

    seen = []

    def spy(run, policy=None, causal_sink=None, template=None):
        seen.append((command, run.policy if run else None, policy, causal_sink, template))
        return resolve(run, policy, causal_sink, template)

    resolve = runs.resolve_settings
    monkeypatch.setattr(runs, "resolve_settings", spy)
    monkeypatch.setattr("segmask.loading.resolve_settings", spy)
    monkeypatch.setattr(segmask.serving.app.uvicorn, "run", lambda app, **_: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    template = ["--chat-template", "{{ messages[0]['content'] }}"]
    model = ["--model", str(saved_run), "--mask", "prefix", "--causal-sink"]
    commands = {
        "generate": ["--prompt", "Once", "--max-new-tokens", "1", "--template", "paper"],
        "chat": template,
        "serve": [],
        "eval": [
            "--data-dir",
            str(commonsense_dir),
            "--tasks",
            "boolq",
            "--limit",
            "1",
            "--scoring",
            "loglik",
        ]
        + ["--out", str(tmp_path / "r.json"), "--no-progress", "--template", "alpaca"],
    }
    for command, argv in commands.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eval's alpaca overrides the run's paper
            assert main([command, *model, *argv]) == 0, capsys.readouterr().err
    assert seen == [
        ("generate", "prefix", "prefix", True, "paper"),
        ("chat", "prefix", "prefix", True, None),
        ("serve", "prefix", "prefix", True, None),
        ("eval", "prefix", "prefix", True, "alpaca"),
    ]
