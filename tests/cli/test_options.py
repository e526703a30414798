"""segmask.cli.options: the model and decoding flags are one definition, shared by the commands that run a
model, and eval, serve and train take their flags from their config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from segmask.cli import build_parser
from segmask.cli.options import add_model_arguments, add_sampling_arguments, config_values, generation_kwargs
from segmask.eval_config import EvalConfig
from segmask.policies import POLICIES, SUPPORTED
from segmask.serving import ServeConfig
from segmask.train_config import TrainConfig

REQUIRED = {"generate": ["--prompt", "x"], "eval": ["--data-dir", "d", "--out", "o.json"]}


@pytest.mark.parametrize("command", ["chat", "generate", "eval", "serve"])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_model_command_reads_model_and_mask(command, policy):
    args = build_parser().parse_args([command, "--model", "m", "--mask", policy, *REQUIRED.get(command, [])])
    assert (args.model, args.mask) == ("m", policy)


@pytest.mark.parametrize("command", ["chat", "generate", "eval", "serve"])
def test_an_unknown_policy_is_refused_by_every_command(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--model", "m", "--mask", "full", *REQUIRED.get(command, [])])
    assert "invalid choice: 'full'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["chat", "generate", "eval", "serve"])
def test_every_model_command_reads_a_chat_template(command):
    """One --chat-template definition (options.add_chat_template_argument), on every command that loads a
    model; its value goes to load_model as is (a file, or an inline template)."""
    parser = build_parser()
    required = REQUIRED.get(command, [])
    assert parser.parse_args([command, "--model", "m", *required]).chat_template is None
    args = parser.parse_args([command, "--model", "m", "--chat-template", "t.jinja", *required])
    assert args.chat_template == "t.jinja"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    assert "--chat-template FILE" in sub.format_help()


def _sampling(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=7)
    return generation_kwargs(parser.parse_args(["--model", "m", *argv]))


def test_generation_kwargs():
    assert _sampling() == {"max_new_tokens": 7, "do_sample": False}
    assert _sampling("--temperature", "0.5") == {
        "max_new_tokens": 7, "do_sample": True, "temperature": 0.5, "top_p": 1.0,
    }  # fmt: skip
    for argv, message in [
        (["--greedy", "--top-p", "0.9"], "--greedy cannot be combined"),
        (["--temperature", "0"], "--temperature must be positive"),
        (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            _sampling(*argv)


@pytest.mark.parametrize("command", ["chat", "generate", "serve"])
def test_every_attn_flag_offers_the_supported_backends(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    (attn,) = [a for a in sub._actions if "--attn" in a.option_strings]
    assert tuple(attn.choices) == SUPPORTED


@pytest.mark.parametrize(
    "command, config, other_flags",
    [
        ("eval", EvalConfig, {"policy": "--mask"}),  # the policy load_model resolves
        ("serve", ServeConfig, {"model_name": "--name"}),
        ("train", TrainConfig, {"policy": "--mask"}),  # the flag metadata["flag"] names
    ],
)
def test_config_fields_are_flags_with_the_fields_defaults(command, config, other_flags):
    """eval, serve and train derive their flags from one dataclass each (add_config_arguments)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = {option for action in sub._actions for option in action.option_strings}
    for field in dataclasses.fields(config):
        assert other_flags.get(field.name, "--" + field.name.replace("_", "-")) in flags, field.name
    if command == "train":
        return  # train's flags override a YAML file: an absent flag leaves no value (tests/cli/test_train.py)
    args = parser.parse_args([command, "--model", "m", *REQUIRED.get(command, [])])
    given = {"data_dir": "d", "out": "o.json"}
    expected = {f.name: given.get(f.name, f.default) for f in dataclasses.fields(config)}
    for name, value in config_values(args, config).items():
        if name != "api_key":  # serve's --api-key defaults to $SEGMASK_API_KEY
            assert value == expected[name], name


def test_config_flags_parse_to_the_field_types():
    args = build_parser().parse_args(
        ["eval", "--model", "m", "--data-dir", "d", "--out", "o.json", "--limit", "3", "--no-resume"]
        + ["--tasks", "boolq", "piqa", "--scoring", "loglik"]
    )
    values = config_values(args, EvalConfig)
    assert (values["limit"], values["resume"], values["tasks"], values["scoring"]) == (
        3, False, ("boolq", "piqa"), "loglik",
    )  # fmt: skip
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--model", "m", "--data-dir", "d", "--out", "o", "--scoring", "x"])
    args = build_parser().parse_args(
        ["serve", "--model", "m", "--prefix-cache-mb", "0.5", "--max-context", "9"]
    )
    assert (args.prefix_cache_mb, args.max_context) == (0.5, 9)
