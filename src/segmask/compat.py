"""The transformers internals segmask leans on, each looked up in one place and checked at run time.

transformers renames things between minor releases (5.24 renamed the forward argument ``past_key_values``
to ``cache``; 5.x changed ``Cache.get_mask_sizes`` from a ``cache_position`` tensor to a query length).
segmask never reads a cache by argument name: it finds the :class:`~transformers.Cache` among the bound
forward arguments by type, asks the cache itself for each layer's key length and offset (the call
``masking_utils`` makes), and passes the cache back under whatever name the installed version expects.
Anything that does not fit raises :class:`TransformersChangedError`, which names the change.

``tests/test_compat.py`` holds one guard test per assumption, so an upstream release that moves one
fails loudly there rather than producing wrong tokens.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache

#: forward-argument names transformers has used for the KV cache, newest first
CACHE_ARGUMENTS = ("cache", "past_key_values")

#: the transformers range ``make test-compat`` proves exact (both ends are tested), as in pyproject.toml
OLDEST, NEWEST = (5, 18), (5, 24)


class TransformersChangedError(RuntimeError):
    """An internal of transformers that segmask depends on is not where segmask expects it."""

    def __init__(self, what: str):
        super().__init__(
            f"transformers {transformers.__version__}: {what}. segmask supports the versions listed in its "
            f"README; please report this with the transformers version"
        )


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``5.24.0`` or ``5.25.0.dev0``."""
    major, minor = (int("".join(ch for ch in part if ch.isdigit()) or 0) for part in version.split(".")[:2])
    return major, minor


def check_version(version: str | None = None) -> None:
    """Refuse a transformers older than the supported range, where exactness tests fail (5.0: GPT-2
    silently ignores a prepared mask; up to 5.16: sliding-window caches cannot be cropped after a prefill;
    5.17: masks mis-sized against a cache). A newer one is allowed: the run-time checks of this module and of
    :mod:`segmask.hook` refuse what they cannot verify, and ``tests/test_compat.py`` names what moved."""
    version = version or transformers.__version__
    if release(version) < OLDEST:
        raise TransformersChangedError(
            f"segmask needs transformers >= {OLDEST[0]}.{OLDEST[1]} (found {version}); older releases run MAS "
            f"masks silently wrong on some models and caches; pip install 'transformers>={OLDEST[0]}.{OLDEST[1]}'"
        )


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward takes the KV cache (``cache`` from 5.24, else ``past_key_values``)."""
    # a peft wrapper's forward takes **kwargs: the name is the wrapped model's
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_parameter(type(base))


@functools.cache
def _cache_parameter(model_class: type) -> str:
    """The cache parameter of ``model_class.forward``, looked up once per class (this runs on every prefill)."""
    parameters = inspect.signature(model_class.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in parameters:
            return name
    raise TransformersChangedError(
        f"{model_class.__name__}.forward takes none of {CACHE_ARGUMENTS}; the KV-cache argument was renamed"
    )


def cache_kwargs(model: torch.nn.Module, cache: Cache | None) -> dict[str, Any]:
    """``{name: cache}`` for a forward or ``generate`` call of ``model``, under the installed version's name."""
    return {cache_argument(model): cache}


def output_cache(outputs: Any) -> Cache | None:
    """The KV cache a forward returned (``outputs.cache`` from 5.24, ``outputs.past_key_values`` before)."""
    for name in CACHE_ARGUMENTS:
        if name in outputs.keys():
            return outputs[name]
    return None


def find_cache(arguments: dict[str, Any]) -> Cache | None:
    """The one :class:`Cache` among a forward call's bound arguments, whatever its name, or None.

    A non-Cache object under a known cache name (a legacy tuple cache) raises: its length is unknown.
    """
    found = {name: value for name, value in arguments.items() if isinstance(value, Cache)}
    if len({id(value) for value in found.values()}) > 1:
        raise ValueError(f"several KV caches passed to one forward call: {sorted(found)}")
    for name in CACHE_ARGUMENTS:
        value = arguments.get(name)
        if value is not None and not isinstance(value, Cache):
            raise ValueError(
                f"{name} is a {type(value).__name__}, not a transformers Cache; segment_ids against a KV cache "
                f"need a Cache object (e.g. DynamicCache) so that its length is known"
            )
    return next(iter(found.values()), None)


def mask_sizes(cache: Cache, q_len: int, layer_idx: int) -> tuple[int, int]:
    """``(kv_length, kv_offset)`` of ``layer_idx`` for ``q_len`` new tokens, as the cache computes them.

    This is the call transformers' ``masking_utils`` makes to size every mask. transformers < 5.2x took
    the new tokens' ``cache_position`` tensor; later versions take the query length.
    """
    method = getattr(cache, "get_mask_sizes", None)
    if method is None:
        raise TransformersChangedError(
            f"{type(cache).__name__} has no get_mask_sizes(); the cache API changed"
        )
    first = next(iter(inspect.signature(method).parameters), None)
    if first == "cache_position":
        past = int(cache.get_seq_length(layer_idx))
        query: Any = torch.arange(past, past + q_len)
    elif first in ("query_length", "q_length"):
        query = q_len
    else:
        raise TransformersChangedError(
            f"{type(cache).__name__}.get_mask_sizes takes {first!r} first, neither cache_position nor "
            f"query_length"
        )
    kv_length, kv_offset = method(query, layer_idx)
    return int(kv_length), int(kv_offset)


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Around peft's model wrapping: peft reads ``model.is_gradient_checkpointing``, which transformers
    >= 5.2x deprecates with a FutureWarning on every ``get_peft_model`` / ``PeftModel.from_pretrained``.
    That warning is peft's business, not the user's; only it is silenced, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def compile_chat_template(source: str) -> None:
    """Compile a chat template as transformers will (its Jinja environment: sandbox, ``loopcontrols``, the
    ``{% generation %}`` tag), without a tokenizer, so that a syntax error is found before any weights
    load. Raises jinja2's ``TemplateSyntaxError``. Uses the private
    ``transformers.utils.chat_template_utils._compile_jinja_template`` (5.18-5.24); if it is gone, a
    ``RuntimeError`` names the change (``tests/test_compat.py`` guards it)."""
    from transformers.utils import chat_template_utils

    compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)
    if compile_template is None:
        raise RuntimeError(
            "transformers no longer has chat_template_utils._compile_jinja_template; segmask.compat."
            "compile_chat_template needs updating for transformers " + transformers.__version__
        )
    compile_template(source)
