"""The vLLM plugin: registration, the mask a model folder asks for, and the checks at engine start.

:func:`register` is the ``vllm.general_plugins`` entry point (``pyproject.toml``); vLLM calls it in every
process (API server, engine core, workers), before any config is built. It

- registers :mod:`.model`'s MAS classes under vLLM's own architecture names (:data:`ARCHITECTURES`), so
  a model folder loads them with no flag; they behave as vLLM's unless :func:`settings_for` finds a mask;
- wraps vLLM's per-architecture config hooks (``MODELS_CONFIG_MAP``) so that every engine start, of any
  architecture, runs :func:`check_engine`, which refuses in one line what would run a MAS model causally.

Where the mask comes from (:func:`settings_for`), first found wins:

    SEGMASK_VLLM_POLICY        mas | prefix | causal      else the folder's segmask.json ``policy``
    SEGMASK_VLLM_CAUSAL_SINK   true | false               else segmask.json ``causal_sink``, else the policy's default
    SEGMASK_VLLM_CHAT_TEMPLATE a Jinja file or inline     else the tokenizer's; set it to the file passed to
                                                          ``--chat-template`` (the model process never sees that flag)

A folder without segmask.json and no ``SEGMASK_VLLM_POLICY``, or with policy ``causal``, is served as vLLM
serves it. The vLLM internals relied on are looked up by :func:`check_internals` (at registration) and
:func:`segmask.integrations.vllm.model.check_layer` (at load); a move raises :class:`VllmChangedError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from segmask.policies import MaskPolicy, check_policy, sink_on

logger = logging.getLogger(__name__)

POLICY_ENV = "SEGMASK_VLLM_POLICY"
CAUSAL_SINK_ENV = "SEGMASK_VLLM_CAUSAL_SINK"
CHAT_TEMPLATE_ENV = "SEGMASK_VLLM_CHAT_TEMPLATE"
#: vLLM architecture name -> the MAS class that serves it (tested on CPU: all three)
ARCHITECTURES = {
    "LlamaForCausalLM": "MasLlamaForCausalLM",
    "Qwen2ForCausalLM": "MasQwen2ForCausalLM",
    "Qwen3ForCausalLM": "MasQwen3ForCausalLM",
}
#: the vLLM release the plugin was tested with (CPU); others run if check_internals passes, with a warning
TESTED_VLLM = (0, 32)
#: what an engine start needs so that every prompt is prefilled whole, in eager mode, by this model
ENGINE_FLAGS = "--enforce-eager --no-enable-prefix-caching --no-enable-chunked-prefill"


class VllmChangedError(RuntimeError):
    """A vLLM internal that the segmask plugin depends on is not where it expects it."""

    def __init__(self, what: str):
        import vllm

        super().__init__(
            f"vllm {vllm.__version__}: {what}. The segmask plugin was tested with vllm "
            f"{TESTED_VLLM[0]}.{TESTED_VLLM[1]}; please report this with the vllm version. To serve models "
            f"without segmask meanwhile (a MAS model would then run causally), leave it out of vLLM's plugin "
            f"allowlist: VLLM_PLUGINS='' (or a comma-separated list of the plugins you use)"
        )


@dataclass(frozen=True)
class ServedMask:
    """The mask a served model prefills under: policy (never ``causal``), sink, chat template source."""

    policy: MaskPolicy
    causal_sink: bool | None = None
    chat_template: str | None = None

    def describe(self) -> str:
        return f"{self.policy} (causal sink {'on' if sink_on(self.policy, self.causal_sink) else 'off'})"


def read_flag(environ: Mapping[str, str], name: str) -> bool | None:
    """An environment flag: ``true``/``1``/``yes``/``on`` or ``false``/``0``/``no``/``off``; unset or empty: None."""
    value = environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {environ[name]!r}")


def settings_for(model: str | Path, environ: Mapping[str, str] = os.environ) -> ServedMask | None:
    """The mask ``model`` (vLLM's ``--model``) is served with, or None: served as vLLM serves it.

    The environment (:data:`POLICY_ENV`, :data:`CAUSAL_SINK_ENV`) overrides the folder's ``segmask.json``
    through :func:`segmask.runs.resolve_settings`, the rule every segmask command follows (it warns on an
    override); :data:`CHAT_TEMPLATE_ENV` replaces the tokenizer's chat template.
    """
    from segmask.loading import read_chat_template
    from segmask.runs import read_run, resolve_settings

    folder = Path(os.path.expanduser(str(model)))
    run = read_run(folder) if folder.is_dir() else None
    requested = environ.get(POLICY_ENV, "").strip() or None
    if requested is not None:
        check_policy(requested)
    if run is None and requested is None:
        return None
    settings = resolve_settings(run, policy=requested, causal_sink=read_flag(environ, CAUSAL_SINK_ENV))
    if settings.policy == "causal":
        return None
    template = environ.get(CHAT_TEMPLATE_ENV) or None
    source = read_chat_template(template) if template is not None else None
    return ServedMask(settings.policy, settings.causal_sink, source)


def check_engine(vllm_config, architecture: str) -> None:
    """Refuse (a one-line ``ValueError``) an engine that would serve a MAS model causally, in part or whole."""
    model_config = vllm_config.model_config
    settings = settings_for(model_config.model)
    if settings is None:
        return
    what = f"segmask: {model_config.model} asks for the {settings.policy} mask"
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{what}, but vLLM serves it as {architecture}, which the segmask plugin does not support "
            f"(supported: {', '.join(ARCHITECTURES)}); it would run causally"
        )
    problems = [
        problem
        for problem, present in (
            ("speculative decoding", vllm_config.speculative_config is not None),
            ("prefix caching", vllm_config.cache_config.enable_prefix_caching),
            ("chunked prefill", vllm_config.scheduler_config.enable_chunked_prefill),
            ("a captured forward (CUDA graphs, torch.compile)", not model_config.enforce_eager),
            ("pipeline parallelism", vllm_config.parallel_config.pipeline_parallel_size > 1),
        )
        if present
    ]
    if problems:
        raise ValueError(
            f"{what}, which {', '.join(problems)} would bypass (prompts split, reused or not seen whole); "
            f"start vLLM with {ENGINE_FLAGS}"
            + (" and no draft model" if "speculative decoding" in problems else "")
        )


def check_internals() -> None:
    """Look up every vLLM internal the plugin uses; :class:`VllmChangedError` names what moved."""
    import vllm

    from segmask.compat import release

    if release(vllm.__version__) != TESTED_VLLM:
        logger.warning("segmask: vllm %s; the plugin was tested with %d.%d", vllm.__version__, *TESTED_VLLM)
    try:
        from vllm import ModelRegistry
        from vllm.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig
        from vllm.forward_context import get_forward_context  # noqa: F401
        from vllm.model_executor.layers.attention import Attention  # noqa: F401
        from vllm.model_executor.models import config as model_configs
    except ImportError as error:
        raise VllmChangedError(f"cannot import {error.name}: {error}") from None
    for owner, name in (
        (ModelRegistry, "register_model"),
        (ModelRegistry, "_normalize_arch"),
        (VllmConfig, "try_verify_and_update_config"),
        (VllmConfig, "speculative_config"),
        (CacheConfig, "enable_prefix_caching"),
        (SchedulerConfig, "enable_chunked_prefill"),
        (ModelConfig, "enforce_eager"),
        (ParallelConfig, "pipeline_parallel_size"),
        (model_configs, "MODELS_CONFIG_MAP"),
        (model_configs, "VerifyAndUpdateConfig"),
    ):
        fields = getattr(owner, "__dataclass_fields__", {})
        if name not in fields and not hasattr(owner, name):
            raise VllmChangedError(f"{getattr(owner, '__name__', owner)} has no {name}")
    if not isinstance(model_configs.MODELS_CONFIG_MAP, dict):
        raise VllmChangedError("MODELS_CONFIG_MAP is no longer a dict")


class CheckedConfigs(dict):
    """vLLM's ``MODELS_CONFIG_MAP`` whose every lookup also runs :func:`check_engine`.

    ``VllmConfig.try_verify_and_update_config`` looks up the architecture, and when nothing is registered
    looks up its normalised name; the hook returned here does that second lookup itself.
    """

    def get(self, architecture, default=None):
        from vllm import ModelRegistry
        from vllm.model_executor.models.config import VerifyAndUpdateConfig

        own = super().get(architecture, default)
        configs = self

        class Checked(VerifyAndUpdateConfig):
            @staticmethod
            def verify_and_update_config(vllm_config) -> None:
                check_engine(vllm_config, architecture)
                found = own
                if found is None:
                    normalized = ModelRegistry._normalize_arch(architecture, vllm_config.model_config)
                    found = dict.get(configs, normalized)
                if found is not None:
                    found.verify_and_update_config(vllm_config)

            @staticmethod
            def verify_and_update_model_config(model_config) -> None:
                if own is not None:
                    own.verify_and_update_model_config(model_config)

        return Checked


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the MAS classes and the start checks (idempotent)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models import config as model_configs

    check_internals()
    for architecture, name in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, f"segmask.integrations.vllm.model:{name}")
    if not isinstance(model_configs.MODELS_CONFIG_MAP, CheckedConfigs):
        model_configs.MODELS_CONFIG_MAP = CheckedConfigs(model_configs.MODELS_CONFIG_MAP)
