"""segmask.cli.options: the model and decoding flags are one definition, shared by the commands that run a
model."""

from __future__ import annotations

import argparse

import pytest

from segmask.attention import SUPPORTED
from segmask.cli import build_parser
from segmask.cli.options import add_model_arguments, add_sampling_arguments, generation_kwargs
from segmask.masks import POLICIES

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
