"""Refuse the parallel modes under which a MAS run would silently train causally.

Two of accelerate's ways of splitting one sequence over many devices throw the MAS mask away:

    context parallelism    (``cp_size > 1``, accelerate's torch backend) shards the sequence, drops the
                           per-layer ``attention_mask`` and calls SDPA with ``is_causal=True`` (accelerate #4177)
    sequence parallelism   (``sp_size > 1``, DeepSpeed Ulysses / ALST) shards the sequence and attends with its
                           own causal mask (accelerate #4209)

Either would run a ``mas`` or ``prefix`` model as a plain causal one, with no error and a healthy-looking
loss. :func:`check_sequence_sharding` finds them wherever accelerate keeps them and raises::

    from segmask.parallel import check_sequence_sharding
    check_sequence_sharding()                                  # environment + a live AcceleratorState
    check_sequence_sharding(trainer.accelerator.parallelism_config)

Pure: it reads attributes of the objects given (accelerate's ``ParallelismConfig``, duck-typed) and the
environment variables ``accelerate launch`` sets; it imports nothing. Data, tensor and FSDP/ZeRO
parallelism keep whole sequences on each device and are fine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

#: environment variables ``accelerate launch --parallelism_config_{cp,sp}_size N`` (or a config file's
#: ``parallelism_config``) sets in every process; ``ParallelismConfig()`` reads them
ENVIRONMENT = {
    "PARALLELISM_CONFIG_CP_SIZE": "context parallelism",
    "PARALLELISM_CONFIG_SP_SIZE": "Ulysses sequence parallelism",
}
_UPSTREAM = {
    "context parallelism": "it drops the attention mask and attends with is_causal=True (accelerate #4177)",
    "Ulysses sequence parallelism": "it attends with its own causal mask (accelerate #4209)",
}


class SequenceShardingError(ValueError):
    """A configuration shards sequences in a way that discards the MAS mask."""


def sharding_modes(parallelism_config=None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The sequence-sharding modes configured, each as ``"<mode> (<where> = <size>)"``; empty when none.

    ``parallelism_config``: accelerate's ``ParallelismConfig`` (or anything with ``cp_size``/``sp_size``;
    ``None``: only the environment and an already-created ``AcceleratorState`` are read). ``environ``:
    defaults to ``os.environ``.
    """
    environ = os.environ if environ is None else environ
    found: list[str] = []
    for name, mode in ENVIRONMENT.items():
        size = _size(environ.get(name))
        if size > 1:
            found.append(f"{mode} ({name}={size})")
    configs = [("parallelism_config", parallelism_config), ("the accelerator state", _live_config())]
    for where, config in configs:
        if config is None:
            continue
        for attribute, mode in (
            ("cp_size", "context parallelism"),
            ("sp_size", "Ulysses sequence parallelism"),
        ):
            size = _size(getattr(config, attribute, None))
            entry = f"{mode} ({where}.{attribute}={size})"
            if size > 1 and not any(item.startswith(mode) for item in found):
                found.append(entry)
    return found


def check_sequence_sharding(parallelism_config=None, environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`SequenceShardingError` (a ``ValueError``, one line) if :func:`sharding_modes` finds any."""
    found = sharding_modes(parallelism_config, environ)
    if not found:
        return
    mode = found[0].split(" (")[0]
    raise SequenceShardingError(
        f"segmask cannot run under {', '.join(found)}: {_UPSTREAM[mode]}, so MAS would silently train as causal; "
        "use data parallelism, FSDP or DeepSpeed ZeRO instead (cp_size and sp_size 1)"
    )


def _size(value) -> int:
    if value is None or value == "":
        return 1
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1  # accelerate itself rejects a malformed size


def _live_config():
    """The ``parallelism_config`` of accelerate's shared ``AcceleratorState`` if one exists (never imports)."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return None
    shared = getattr(getattr(state, "AcceleratorState", None), "_shared_state", None)
    try:
        return shared.get("parallelism_config") if shared else None
    except Exception:  # a SharedDict whose storage is not set up in this thread
        return None
