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
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"README example failed:\n{code}\n{result.stderr[-2000:]}"


def test_setup_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    first = blocks("bash")[0]
    for target in re.findall(r"^make (\w+)", first, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README names `make {target}`, the Makefile lacks it"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "SEGMASK_REQUIRE_SHARED=1" in ci
