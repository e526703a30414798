"""`segmask train`: every TrainConfig field is a flag overriding the YAML file, bad configurations exit
with a message, and the trained folder runs in `segmask generate` with its recorded policy."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
from conftest import write_recipe

from segmask.cli import build_parser, main
from segmask.training import TrainConfig


def test_every_config_field_is_a_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("flag", "--" + field.name.replace("_", "-")) in text, field.name
    # the policy is --mask, as in every command that takes one (generate, chat, eval, serve)
    assert "--mask POLICY" in text and "--policy" not in text
    assert build_parser().parse_args(["train", "--mask", "prefix"]).policy == "prefix"
    args = build_parser().parse_args(
        [
            "train",
            "run.yaml",
            "--lora-r",
            "0",
            "--data",
            "a.json",
            "b.json",
            "--no-group-by-length",
            "--resume",
        ]
    )
    assert args.config == "run.yaml" and args.lora_r == "0" and args.data == ["a.json", "b.json"]
    assert args.group_by_length is False and args.resume is True
    assert not hasattr(args, "policy") and not hasattr(
        args, "learning_rate"
    )  # unset flags leave the YAML alone


@pytest.fixture
def recipe(stories_path, tmp_path):
    records = [
        {"instruction": f"What did {name} see?", "input": "", "output": f"{name} saw a {thing}."}
        for name in ("Lily", "Tom", "Sue") for thing in ("cat", "dog", "ball")
    ]  # fmt: skip
    return write_recipe(
        tmp_path,
        stories_path,
        records,
        "batch_size: 3\ngradient_accumulation_steps: 1\nlearning_rate: 1e-2\nwarmup_steps: 0\nlora_r: 8\n"
        "lora_alpha: 16\ncutoff_len: 128\nlogging_steps: 1\n",
    )


def test_train_then_generate_with_the_recorded_policy(recipe, tmp_path, capsys):
    output = tmp_path / "run"
    argv = ["train", str(recipe), "--mask", "prefix", "--max-steps", "3", "--output", str(output)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(f"trained (prefix) -> {output}")
    info = json.loads((output / "segmask.json").read_text())
    assert info["policy"] == "prefix" and info["train_config"]["max_steps"] == 3
    assert info["train_config"]["learning_rate"] == 1e-2  # from the YAML, a string there

    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps({"instruction": "What did Lily see?", "input": ""}))
    generate = [
        "generate",
        "--model",
        str(output),
        "--messages",
        str(prompt),
        "--max-new-tokens",
        "6",
        "--json",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the recorded policy is used: no override warning
        assert main(generate) == 0
    recorded = json.loads(capsys.readouterr().out)
    assert main([*generate, "--mask", "prefix"]) == 0
    assert json.loads(capsys.readouterr().out) == recorded and len(recorded["token_ids"]) > 0

    # a second run into the same folder must not silently replace it
    assert main(argv) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err

    # resuming the finished run says so and changes no byte
    files = {p: p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}
    assert main([*argv, "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"{output} already finished at step 3; nothing to do" in captured.err
    assert captured.out.strip() == f"trained (prefix) -> {output}"
    assert {p: p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()} == files


@pytest.mark.parametrize(
    "extra, yaml_line, message",
    [
        ([], "learning_rte: 0.1\n", "unknown config key 'learning_rte'; did you mean 'learning_rate'"),
        (["--learning-rate", "-1"], "", "learning_rate must be positive"),
        (["--mask", "mas", "--attn-implementation", "flash_attention_2"], "", "cannot run mask 'mas'"),
        (["--cutoff-len", "12"], "", "cutoff_len 12 is shorter than the prompt template"),
        (["--data", "missing.json"], "", "data file not found: missing.json"),
    ],
)
def test_bad_configuration_exits_2_with_its_message(recipe, tmp_path, capsys, extra, yaml_line, message):
    recipe.write_text(recipe.read_text() + yaml_line)
    assert main(["train", str(recipe), "--output", str(tmp_path / "run"), *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith("segmask train: error:") and message in error
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("where, message", [("notes.txt", "is a file, not a folder"),
                                             ("notes.txt/run", "cannot write to output")])  # fmt: skip
def test_an_output_that_cannot_be_written_exits_2_with_one_line(recipe, tmp_path, capsys, where, message):
    (tmp_path / "notes.txt").write_text("precious")
    before = sorted(tmp_path.rglob("*"))
    assert main(["train", str(recipe), "--output", str(tmp_path / where), "--max-steps", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("segmask train: error: ") and message in error and str(tmp_path / where) in error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "notes.txt").read_text() == "precious"


def test_two_processes_train_as_one_data_parallel_job(recipe, tmp_path):
    """`torchrun --nproc_per_node 2 -m segmask train` on CPU: one gloo DDP job, rank 0 alone writes the run.

    The 9 records are split over the two processes (5 each, the sampler pads), 2 batches of 3 per process:
    an epoch is 2 steps (one process alone: 3 steps), and two independent jobs would write each step twice."""
    import subprocess
    import sys
    from pathlib import Path

    output = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "segmask", "train"]
    command += [str(recipe), "--mask", "mas", "--max-steps", "3", "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained (mas)") == 1
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in steps if "loss" in row]
    assert [row["step"] for row in logged] == [1, 2, 3]  # one writer
    assert [row["epoch"] for row in logged] == pytest.approx([0.5, 1.0, 1.5])
    assert (output / "segmask.json").exists() and (output / "adapter_model.safetensors").exists()


def test_chat_template_is_a_flag_overriding_the_yaml(tmp_path):
    """--chat-template, as serve, generate, chat and eval have it; absent, the YAML file's value stands."""
    parse = build_parser().parse_args
    assert not hasattr(parse(["train", "run.yaml"]), "chat_template")
    assert parse(["train", "run.yaml", "--chat-template", "chatml.jinja"]).chat_template == "chatml.jinja"
    recipe = tmp_path / "run.yaml"
    recipe.write_text("model: m\ndata: [a.json]\nchat_template: mine.jinja\n")
    assert TrainConfig.from_yaml(recipe).chat_template == "mine.jinja"


def test_chat_data_on_a_model_without_a_template_names_the_flag(stories_path, tmp_path, capsys):
    """The message told the user to pass chat_template=, a Python argument that train had no flag for."""
    chats = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    chats.write_text(json.dumps({"messages": turns}) + "\n")
    argv = ["train", "--model", str(stories_path), "--data", str(chats), "--output", str(tmp_path / "run")]
    assert main([*argv, "--max-steps", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("segmask train: error: ") and "pass --chat-template FILE" in error
    assert error.count("\n") == 1 and "chat_template=" not in error
