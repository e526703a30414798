"""The README stays true: its Python examples run, and its set-up commands exist."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT, STORIES, require_shared

README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_examples_run():
    require_shared(STORIES)
    examples = blocks("python")
    assert examples, "the README shows no Python example"
    for code in examples:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"README example failed:\n{code}\n{result.stderr[-2000:]}"


def test_setup_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    first = blocks("bash")[0]
    for target in re.findall(r"^make (\w+)", first, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), (
            f"README names `make {target}`, the Makefile lacks it"
        )
    for command in shell_commands():
        if command.startswith("make "):
            for target in command.split("#")[0].split()[1:]:
                assert re.search(rf"^{target}:", makefile, flags=re.M), f"README names `make {target}`"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test-compat" in ci and "SEGMASK_REQUIRE_SHARED=1" in ci


def shell_commands() -> list[str]:
    """Every command line of the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_segmask_commands_parse_against_the_real_cli():
    """Each `segmask ...` line the README shows is accepted by the CLI (the commands themselves run in the
    CLI tests of each module); files it names exist."""
    import shlex

    from segmask.cli import build_parser

    parser = build_parser()
    seen = set()
    for command in shell_commands():
        if " -m segmask " in command:  # accelerate launch / torchrun ... -m segmask COMMAND ...
            command = "segmask " + command.split(" -m segmask ", 1)[1]
        if not command.startswith("segmask "):
            continue
        argv = shlex.split(command.replace("$SMOL", "model.gguf").replace('"$KEY"', "key"), comments=True)
        seen.add(argv[1])
        try:
            parser.parse_args(argv[1:])
        except SystemExit as error:
            raise AssertionError(f"README command does not parse: {command}") from error
        for value in argv:
            if value.startswith(("docs/", "configs/")):
                assert (ROOT / value.rstrip("/")).exists(), f"README names a missing file: {value}"
    assert {"generate", "eval", "compare", "viz", "serve"} <= seen
