"""lm-eval plugin discovery: the installed package declares `segmask` in the `lm_eval.models` entry-point
group (lm-eval main, PR #4013), and it loads the class lm_eval's own registry holds under that name.

Needs the package installed (`pip install -e .`), as `make setup` does; the metadata is read from there."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from conftest import ROOT

pytest.importorskip("lm_eval")
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

GROUP = "lm_eval.models"


def declared() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"][GROUP]


def test_pyproject_declares_the_model_entry_point():
    assert declared() == {"segmask": "segmask.integrations.lm_eval:SegmaskLM"}


def test_the_installed_entry_point_resolves_to_the_registered_model_class():
    found = [ep for ep in entry_points(group=GROUP) if ep.name == "segmask"]
    assert len(found) == 1, f"no installed `segmask` entry point in {GROUP}; reinstall with pip install -e ."
    (point,) = found
    assert point.value == declared()["segmask"]  # the installed metadata is the current pyproject's
    model_class = point.load()

    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    from segmask.integrations.lm_eval import NAME, SegmaskLM

    assert model_class is SegmaskLM and issubclass(model_class, LM)
    assert NAME == "segmask" and get_model("segmask") is model_class  # what `--model segmask` resolves to


def test_the_wrapper_command_is_kept():
    """lm_eval 0.4.13 (the newest release) reads no entry points: segmask-lm-eval stays the way in."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["segmask-lm-eval"] == "segmask.integrations.lm_eval:main"
    assert [ep.value for ep in entry_points(group="console_scripts") if ep.name == "segmask-lm-eval"] == [
        "segmask.integrations.lm_eval:main"
    ]
