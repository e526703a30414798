"""The settings' vocabulary: mask policies, attention backends and the causal-sink rule, without torch.

Everything a command line or a config file must name before it loads a model lives here, so that
``segmask <command> --help`` imports no heavy library (the CLI's start-up, issue 32).
"""

from __future__ import annotations

from typing import Literal, get_args

MaskPolicy = Literal["causal", "mas", "prefix"]
POLICIES: tuple[str, ...] = get_args(MaskPolicy)


def check_policy(policy: str) -> MaskPolicy:
    """Return ``policy`` if it names a mask policy, else raise a ``ValueError`` listing the valid ones."""
    if policy not in POLICIES:
        raise ValueError(f"unknown mask policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return policy  # type: ignore[return-value]


#: the attention implementations ``segmask.enable`` runs MAS on (the one backend list every CLI uses)
SUPPORTED = ("eager", "sdpa", "flex_attention", "segmask")


#: what the ``causal_sink`` option does, in the words every flag and config field shows
CAUSAL_SINK_HELP = (
    "keep token 0 (the BOS, else the first prompt token: the attention sink) causal under mas and prefix "
    "(default: on under mas, off under prefix; false under mas is the paper's mask)"
)
#: the same, for an option whose absence means "as the model was trained"
CAUSAL_SINK_HELP_RUN = (
    "keep token 0 (the BOS, else the first prompt token: the attention sink) causal under mas and prefix "
    "(default: as the model was trained, else on under mas and off under prefix)"
)
#: ``causal_sink=None`` per policy (:func:`sink_on`): on under ``mas`` since the demo study (issue 20)
DEFAULT_CAUSAL_SINK: dict[str, bool] = {"causal": False, "mas": True, "prefix": False}


def sink_on(policy: MaskPolicy, causal_sink: bool | None = None) -> bool:
    """Whether token 0 is made causal under ``policy``: ``causal_sink`` if given, else the policy's default
    (:data:`DEFAULT_CAUSAL_SINK`: on under ``mas``, off under ``prefix``); never under ``causal``, whose
    tokens are all causal already. ``sink_on("mas") -> True``, ``sink_on("mas", False) -> False``."""
    policy = check_policy(policy)
    if causal_sink is not None and not isinstance(causal_sink, bool):
        raise ValueError(f"causal_sink must be true, false or None, got {causal_sink!r}")
    if policy == "causal":
        return False
    return DEFAULT_CAUSAL_SINK[policy] if causal_sink is None else causal_sink
