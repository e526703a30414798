"""A fine-tuned run's ``segmask.json``, and the one rule for which settings a command runs a model with.

``segmask train`` writes :class:`Run` next to the weights, last; every loader reads it with :func:`read_run`
(once per command), and :func:`resolve_settings` decides the mask policy, the causal sink and the
instruction template from what was asked and what the run saved::

    run = read_run("runs/mas-lora")            # Run(policy='mas', causal_sink=True, template='alpaca', ...)
    settings = resolve_settings(run, policy=None, causal_sink=None, template="paper")
    settings.policy, settings.causal_sink, settings.template    # 'mas', True, 'paper' (and a warning)

``segmask.json``::

    {"policy": "mas", "causal_sink": true, "template": "alpaca", "base_model": "/abs/base",
     "adapter": true, "train_config": {...}, "data_fingerprint": "...", "segmask_version": "0.1.0"}

A file written before a key existed still reads: no ``causal_sink`` is ``false`` (the option did not
exist), no ``adapter`` is ``false``, no ``template`` is none (prompted in ``alpaca``).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segmask.files import write_json_atomic
from segmask.policies import MaskPolicy, check_policy
from segmask.templates import DEFAULT_TEMPLATE, TEMPLATES, InstructionTemplate, check_template

RUN_FILE = "segmask.json"
DEFAULT_POLICY: MaskPolicy = "mas"


@dataclass(frozen=True)
class Run:
    """What a fine-tuning run wrote to ``segmask.json``; checked on construction.

    ``template`` is what the records were prompted with: an instruction template of
    :data:`segmask.templates.TEMPLATES`, ``chat_template``, or both joined by ``+``. ``adapter``: LoRA weights
    over ``base_model`` (an absolute path, or one relative to the run folder), else full weights.
    """

    policy: MaskPolicy
    base_model: str
    adapter: bool = False
    causal_sink: bool = False
    template: str | None = None
    train_config: dict[str, Any] | None = None
    data_fingerprint: str | None = None
    segmask_version: str | None = None

    def __post_init__(self) -> None:
        check_policy(self.policy)
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError(f"{RUN_FILE}: 'base_model' must be a non-empty path, got {self.base_model!r}")
        for name in ("adapter", "causal_sink"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{RUN_FILE}: {name!r} must be true or false, got {getattr(self, name)!r}")

    def to_json(self) -> dict[str, Any]:
        """The ``segmask.json`` mapping, keys in the order a run has always written them."""
        keys = ("policy", "causal_sink", "template", "base_model", "adapter", "train_config")
        return {key: getattr(self, key) for key in (*keys, "data_fingerprint", "segmask_version")}


def write_run(folder: str | Path, run: Run) -> Path:
    """Write ``run`` to ``folder/segmask.json`` atomically; returns the file."""
    return write_json_atomic(Path(folder) / RUN_FILE, run.to_json())


def read_run(folder: str | Path) -> Run | None:
    """The :class:`Run` of a fine-tuned output folder, or ``None`` if ``folder`` is no folder holding a
    ``segmask.json``; a file that is not JSON, or lacks ``policy`` or ``base_model``, is a ``ValueError``."""
    file = Path(folder) / RUN_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    missing = [key for key in ("policy", "base_model") if key not in data]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)}")
    known = {field.name for field in dataclasses.fields(Run)}
    values = {key: value for key, value in data.items() if key in known}
    return Run(**{"adapter": False, "causal_sink": False, **values})


@dataclass(frozen=True)
class Settings:
    """The settings a model runs with (:func:`resolve_settings`).

    ``causal_sink`` ``None`` is the default of the policy each prompt is encoded under
    (:func:`segmask.policies.sink_on`: on under ``mas``), so that a request or a chat that picks another
    policy gets that policy's default.
    """

    policy: MaskPolicy
    causal_sink: bool | None
    template: InstructionTemplate


def resolve_settings(
    run: Run | None,
    policy: str | None = None,
    causal_sink: bool | None = None,
    template: str | None = None,
) -> Settings:
    """What to run a model with: each setting as asked, else as its ``run`` saved, else the default.

    - ``policy``: else the run's, else ``mas``;
    - ``causal_sink``: else the run's (``False`` for a run saved before the option), else ``None``: the
      policy's default (:class:`Settings`);
    - ``template``: else the run's when it is one instruction template, else ``alpaca``.

    Asking for another value than the run saved warns: a model runs best as it was trained. A bad value
    is a ``ValueError``. Every command that loads a model (and :func:`segmask.serving.serve`) calls this,
    through :func:`segmask.loading.load`.
    """
    if policy is not None:
        check_policy(policy)
    if causal_sink is not None and not isinstance(causal_sink, bool):
        raise ValueError(f"causal_sink must be true, false or None, got {causal_sink!r}")
    if template is not None:
        check_template(template)
    saved_template = run.template if run is not None and run.template in TEMPLATES else None
    if run is not None:
        overrides = (
            (
                policy,
                run.policy,
                f"mask policy {run.policy!r}; running it with {policy!r} instead. "
                "Evaluating with a mask other than the one trained with hurts accuracy.",
            ),
            (
                causal_sink,
                run.causal_sink,
                f"causal_sink={run.causal_sink}; running it with causal_sink={causal_sink} instead",
            ),
            (
                template,
                saved_template,
                f"template {saved_template!r}; prompting it with {template!r} instead",
            ),
        )
        for asked, saved, text in overrides:
            if asked is not None and saved is not None and asked != saved:
                warnings.warn(f"this model was trained with {text}", UserWarning, stacklevel=3)
    if causal_sink is None and run is not None:
        causal_sink = run.causal_sink
    return Settings(
        policy=policy or (run.policy if run is not None else DEFAULT_POLICY),  # type: ignore[arg-type]
        causal_sink=causal_sink,
        template=template or saved_template or DEFAULT_TEMPLATE,  # type: ignore[arg-type]
    )
