"""No segment ids may reach a model that segmask did not enable: they would be ignored, and MAS run causal.

transformers' forwards take ``**kwargs`` and pass them on unread, so ``model(input_ids, segment_ids=...)`` on
a model that never went through :func:`segmask.enable` runs the plain causal mask without a word. Two checks
close that path:

- every segmask function that runs a model with segment ids (prefill, generation, chat, scoring, the leak
  check) calls :func:`segmask.hook.require_enabled` first and raises :class:`NotEnabledError`;
- where segmask does not make the call itself (a ``segmask.Collator`` batch in a plain transformers
  ``Trainer``), :func:`install` wraps transformers' registered ``sdpa`` and ``flex_attention`` functions so
  that segment ids arriving there raise. It runs as soon as segmask encodes a MAS example
  (:class:`segmask.segments.Encoded`), batches one, or enables a model, so the check does not depend on
  the order things happen in. On an enabled model they never arrive: segmask's hook takes them off
  the decoder's arguments. A model on ``eager`` attention (the model's own function, which transformers does
  not look up in its registry) is not covered: there the README's rule holds, enable the model first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

GUARDED = ("sdpa", "flex_attention")


class NotEnabledError(ValueError):
    """Segment ids were given to a model without segmask's hook: it would have run causal attention."""


def asks_for_mas(segment_ids, document_ids=None) -> bool:
    """Whether ids ask for more than the causal mask: a segment id ``>= 0``, or documents."""
    if document_ids is not None:
        return True
    if segment_ids is None:
        return False
    import torch  # noqa: PLC0415  (here: segments imports this module, and must stay light)

    return bool((torch.as_tensor(segment_ids) >= 0).any())


def check(kwargs: dict, where: str) -> None:
    """Raise :class:`NotEnabledError` if an attention call's ``kwargs`` carry ids that ask for MAS."""
    if asks_for_mas(kwargs.get("segment_ids"), kwargs.get("document_ids")):
        raise NotEnabledError(message(where))


def message(where: str) -> str:
    return (
        f"{where}: the model was not passed to segmask.enable(), so transformers would ignore segment_ids "
        f"and run plain causal attention; call segmask.enable(model) before training, generating or "
        f"evaluating with segment ids"
    )


def _guarded(function: Callable) -> Callable:
    @functools.wraps(function)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        check(kwargs, f"segment ids reached {type(module).__name__}'s attention")
        return function(module, query, key, value, attention_mask, *args, **kwargs)

    attention.segmask_guard = True
    return attention


def install() -> None:
    """Wrap transformers' registered ``sdpa`` and ``flex_attention`` functions with the check. Idempotent.

    Raises ``TransformersChangedError`` if the registry moved (the check would then silently not run)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from segmask.compat import TransformersChangedError

    for name in GUARDED:
        function = ALL_ATTENTION_FUNCTIONS.get(name)
        if function is None:
            raise TransformersChangedError(f"its AttentionInterface has no {name!r} entry to guard")
        if not getattr(function, "segmask_guard", False):
            AttentionInterface.register(name, _guarded(function))
