"""Run any transformers causal LM under the MAS mask: ``segmask.enable(model)``.

After ``enable``, the model's forward accepts ``segment_ids`` (and ``document_ids``) next to its usual
arguments; Trainer, peft, accelerate and ``generate`` keep working on the same object, and without those
arguments the model behaves exactly as before::

    model = segmask.enable(AutoModelForCausalLM.from_pretrained(path))
    out = model(input_ids, segment_ids=segment_ids)          # [B, L] each

How: a forward pre-hook on the decoder stack (``model.get_decoder()``, which every ``*ForCausalLM`` calls
with its kwargs) turns the ids into the mask representation the model's attention backend needs, and
hands it over as a prepared 4-D ``attention_mask``, which transformers' ``masking_utils`` passes through
untouched (a dict ``{layer_type: mask}`` for models that mix full and sliding-window layers):

    eager            additive float mask (a boolean mask there would be added as 0/1 and mask nothing)
    sdpa             boolean mask, empty (padded) query rows made safe
    flex_attention   a ``BlockMask`` (a dense tensor there crashes)
    segmask          no mask at all: :func:`segmask_attention_forward` runs the exact segment-blocked
                     kernel of :mod:`segmask.fast_attention` (registered by :func:`register`)
    flash_attention_* refused: transformers' flash path drops custom masks silently

Sliding-window layers keep their window: MAS is intersected with ``|i - j| < window``.
Packed rows must pass ``document_ids`` (and per-document ``position_ids``): the mask is built from
``document_ids`` explicitly rather than inferred from ``position_ids``.
"""

from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass

import torch
from torch import nn

from segmask import compat, guard, masks, parallel
from segmask.attention_plan import Layout
from segmask.fast_attention import dense_attention, layout_attention
from segmask.policies import SUPPORTED

logger = logging.getLogger(__name__)

IMPLEMENTATION = "segmask"
"""Name of the transformers attention implementation registered by :func:`register`."""
_HANDLE = "_segmask_hook"


class ContextOverflowError(ValueError):
    """More tokens than the model's positions (``max_position_embeddings``): past them a model writes
    garbage or crashes deep inside torch, so segmask refuses first."""


@dataclass(frozen=True)
class LayerMask:
    """How one layer type attends: full attention, or a sliding window of ``window`` positions."""

    layer_type: str
    window: int | None


def enable(model: nn.Module, fast: bool = True) -> nn.Module:
    """Make ``model`` accept ``segment_ids`` / ``document_ids`` in its forward. Idempotent; returns ``model``.

    ``segment_ids``: LongTensor ``[B, Q]`` for the current input tokens (tokens already in the KV cache are
    then causal, which is exact since no segment continues across calls) or ``[B, K]`` covering cached and
    current tokens. ``document_ids``: same shapes, for packed rows.

    With ``fast`` (the default), a model on ``sdpa`` moves to the ``segmask`` implementation: the same SDPA
    kernels, but MAS calls run segment-blocked with no L x L mask (exact; see :mod:`segmask.fast_attention`).
    Calls without segment ids are plain SDPA there.
    """
    compat.check_version()
    guard.install()  # segment ids given to this model after disable(), or to another one, raise
    parallel.check_sequence_sharding()  # context / sequence parallelism would drop the mask silently
    decoder = _decoder(model)
    if fast and (decoder.config._attn_implementation or "eager") == "sdpa":
        register()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation(IMPLEMENTATION)
    if getattr(decoder, _HANDLE, None) is None:
        handles = (
            decoder.register_forward_pre_hook(_pre_hook, with_kwargs=True),
            decoder.register_forward_hook(_post_hook),
        )
        setattr(decoder, _HANDLE, handles)
    check_implementation(model)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable`."""
    decoder = _decoder(model)
    handles = getattr(decoder, _HANDLE, None)
    if handles is not None:
        for handle in handles:
            handle.remove()
        setattr(decoder, _HANDLE, None)
    return model


def is_enabled(model: nn.Module) -> bool:
    return getattr(_decoder(model), _HANDLE, None) is not None


def require_enabled(
    model: nn.Module, segment_ids: torch.Tensor | None, document_ids: torch.Tensor | None = None
) -> None:
    """Raise :class:`segmask.guard.NotEnabledError` if ``model`` would ignore these ids (not enabled).

    Ids that ask for nothing but the causal mask (every segment id ``-1``, no documents) need no hook; a
    module that is not a transformers model (no ``get_decoder``) reads its own arguments and is not checked."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "get_decoder"):
        return
    if guard.asks_for_mas(segment_ids, document_ids) and not is_enabled(model):
        raise guard.NotEnabledError(guard.message(f"segment ids given to {type(model).__name__}"))


def check_implementation(model: nn.Module) -> str:
    """Return the model's attention implementation, or raise if MAS cannot run on it exactly."""
    config = _decoder(model).config
    implementation = config._attn_implementation or "eager"
    if implementation.startswith("flash_attention") or implementation.startswith("paged"):
        raise ValueError(
            f"attention implementation {implementation!r} drops custom masks in transformers, so MAS would "
            f"silently run as causal; load the model with attn_implementation='segmask' (fast, exact), "
            f"'sdpa', 'eager' or 'flex_attention'"
        )
    if implementation not in SUPPORTED:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported by segmask; use one of {SUPPORTED}"
        )
    return implementation


def segmask_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention implementation ``"segmask"`` (signature of ``sdpa_attention_forward``).

    With ``segmask_layout`` (a :class:`Layout` over all ``K`` key positions, set by the pre-hook) it runs
    :func:`segmask.fast_attention.layout_attention` and ignores ``attention_mask`` (a placeholder);
    sliding-window layers take the dense route with the window applied. Without it, it is transformers'
    ``sdpa_attention_forward``. Returns ``attn_output [B, Q, Hq, D]`` and no attention weights.
    """
    layout = kwargs.pop("segmask_layout", None)
    if layout is None:
        guard.check(kwargs, f"segment ids reached {type(module).__name__}'s attention")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    kv_len = layout.segment_ids.shape[1]
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    layout.check_keys(key.shape[2], window)
    if key.shape[2] > kv_len:  # a static cache's unused slots (the cache said so), later than every real one
        key, value = key[:, :, :kv_len], value[:, :, :kv_len]
    if window is not None:
        output = dense_attention(query, key, value, layout, scaling, dropout, window)
    else:
        output = layout_attention(query, key, value, layout, scaling, dropout)
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"segmask"`` with transformers: :func:`segmask_attention_forward` and, for calls without a
    layout (plain causal forward, decoding without segment ids), transformers' own ``sdpa_mask``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, segmask_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def layer_masks(config) -> list[LayerMask]:
    """The distinct attention layer types of a model config, each with its sliding window (or None)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:
        # Mistral / Phi-3 style: one window for every layer when set (and not switched off)
        uses_window = window is not None and getattr(config, "use_sliding_window", True)
        types = ["sliding_attention" if uses_window else "full_attention"]
    result = []
    for layer_type in dict.fromkeys(types):
        if layer_type == "full_attention":
            result.append(LayerMask(layer_type, None))
        elif layer_type == "sliding_attention":
            if not window:
                raise ValueError("config has sliding_attention layers but no sliding_window")
            result.append(LayerMask(layer_type, int(window)))
        else:
            raise ValueError(
                f"segmask does not support layer type {layer_type!r} (only full and sliding attention)"
            )
    return result


def _decoder(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    if not hasattr(base, "get_decoder"):
        raise ValueError(f"{type(base).__name__} is not a transformers model (no get_decoder())")
    return base.get_decoder()


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if "segment_ids" not in kwargs and "document_ids" not in kwargs:
        return args, kwargs
    kwargs = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
    extra = kwargs.pop("kwargs", None)  # the **kwargs bucket of the signature
    if extra:
        kwargs.update(extra)
    segment_ids = kwargs.pop("segment_ids", None)
    document_ids = kwargs.pop("document_ids", None)
    if segment_ids is None and document_ids is None:
        return (), kwargs
    cache = compat.find_cache(kwargs)  # by type, whatever the installed version calls the argument
    past = int(cache.get_seq_length()) if cache is not None else 0
    mask = prepare_mask(module, kwargs, segment_ids, document_ids, cache, past)
    _expected.calls = getattr(_expected, "calls", {})
    _expected.calls[id(module)] = (cache, past)
    if isinstance(mask, _FastMask):
        mask, kwargs["segmask_layout"] = mask.placeholder, mask.layout
    elif isinstance(mask, dict) and any(isinstance(value, _FastMask) for value in mask.values()):
        kwargs["segmask_layout"] = next(iter(mask.values())).layout
        mask = {layer_type: value.placeholder for layer_type, value in mask.items()}
    kwargs["attention_mask"] = mask
    return (), kwargs


_expected = threading.local()  # per thread: decoder id -> (cache found by the pre-hook, its length then)


def _post_hook(module: nn.Module, args: tuple, output) -> None:
    """After a MAS forward: the cache must have grown by exactly the new tokens the mask was built for.

    This catches a cache the pre-hook could not see (a renamed or wrapped argument), which would have
    made the mask assume no cached tokens: the call raises rather than return wrong logits or tokens.
    """
    calls = getattr(_expected, "calls", {})
    if id(module) not in calls:
        return
    cache, past = calls.pop(id(module))
    returned = compat.output_cache(output) if hasattr(output, "keys") else None
    if returned is None:
        return
    if cache is None:
        cache, past = returned, 0
    q_len = output[0].shape[1]
    if returned is not cache or int(cache.get_seq_length()) != past + q_len:
        raise compat.TransformersChangedError(
            f"the MAS mask was built for {past} cached + {q_len} new keys, but the KV cache returned by "
            f"{type(module).__name__} holds {int(returned.get_seq_length())}; the cache argument was not "
            f"recognised"
        )


@dataclass(frozen=True)
class _FastMask:
    placeholder: torch.Tensor
    layout: object


def prepare_mask(
    decoder: nn.Module,
    kwargs: dict,
    segment_ids: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    cache=None,
    past: int = 0,
):
    """Build the backend's mask(s) for one forward call of ``decoder`` from token-level ids.

    ``cache``: the KV cache of the call (or None), holding ``past`` tokens before it."""
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        raise ValueError("segment_ids given but neither input_ids nor inputs_embeds")
    batch_size, q_len = inputs.shape[:2]
    device = inputs.device
    kv_len = past + q_len

    attention_mask = kwargs.get("attention_mask")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
            raise ValueError(
                "segment_ids need a 2-D padding attention_mask [batch, seq_len] (or none), not a prepared mask"
            )
        if attention_mask.shape != (batch_size, kv_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch_size, kv_len)} "
                f"({past} cached + {q_len} new tokens)"
            )
        attention_mask = attention_mask.to(device)
    segment_ids = _full_length(segment_ids, "segment_ids", batch_size, q_len, past, device, fill=-1)
    if document_ids is not None:
        if past and document_ids.shape[-1] == q_len:
            raise ValueError(
                "with a KV cache, document_ids must cover cached and new tokens: [batch, cached + new]"
            )
        document_ids = _full_length(document_ids, "document_ids", batch_size, q_len, past, device, fill=0)
    masks.validate_layout(segment_ids, attention_mask, document_ids)

    context = int(getattr(decoder.config, "max_position_embeddings", 0) or 0)
    if context and kv_len > context:
        raise ContextOverflowError(
            f"a MAS forward over {kv_len} positions ({past} cached + {q_len} new tokens), more than the "
            f"model's context of {context} (max_position_embeddings); cut the records to fit "
            f"(segmask.segments.apply_cutoff, or the Collator's max_length)"
        )
    implementation = check_implementation(decoder)
    layers = layer_masks(decoder.config)
    sizes = {layer.layer_type: _key_sizes(decoder.config, cache, layer, q_len, kv_len) for layer in layers}

    if implementation == "segmask":
        placeholder = torch.ones((), dtype=torch.bool, device=device).expand(batch_size, 1, q_len, kv_len)
        key_lengths = {layer.window: sizes[layer.layer_type][0] for layer in layers}
        layout = Layout(
            segment_ids=segment_ids,
            attention_mask=attention_mask,
            document_ids=document_ids,
            key_lengths=key_lengths,
        )
        fast = _FastMask(placeholder, layout)
        return fast if len(layers) == 1 else {layer.layer_type: fast for layer in layers}

    built = {}
    for layer in layers:
        layer_kv_len, kv_offset = sizes[layer.layer_type]
        built[layer.layer_type] = _represent(
            implementation,
            segment_ids,
            attention_mask,
            document_ids,
            q_len,
            layer.window,
            kv_offset,
            layer_kv_len,
            _dtype(decoder, kwargs),
        )
    if len(built) == 1:
        return next(iter(built.values()))
    return built


def _key_sizes(config, cache, layer: LayerMask, q_len: int, kv_len: int) -> tuple[int, int]:
    """``(key length, offset of the first key)`` of ``layer``'s attention for ``q_len`` new tokens.

    Without a cache the keys are the ``kv_len`` tokens of the call. With one, the cache says (the call
    transformers' ``masking_utils`` makes): a sliding-window layer keeps only its window, a static cache
    has unused slots after the real tokens. A full-attention layer must hold every real token from 0.
    """
    if cache is None:
        return kv_len, 0
    types = getattr(config, "layer_types", None)
    layer_idx = types.index(layer.layer_type) if types else 0
    length, offset = compat.mask_sizes(cache, q_len, layer_idx)
    if layer.window is None and (offset != 0 or length < kv_len):
        raise ValueError(
            f"the mask covers {kv_len} key positions ({kv_len - q_len} cached + {q_len} new tokens) but the "
            f"KV cache's full-attention layer {layer_idx} holds {length} keys from offset {offset}"
        )
    return length, offset


def _represent(
    implementation: str,
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    q_len: int,
    window: int | None,
    kv_offset: int,
    kv_len: int,
    dtype: torch.dtype,
):
    if implementation == "flex_attention":
        if kv_offset or kv_len != segment_ids.shape[-1]:
            raise ValueError(
                "flex_attention with a sliding-window KV cache is not supported; use sdpa or eager"
            )
        return masks.block_mask(segment_ids, attention_mask, document_ids, q_len=q_len, sliding_window=window)
    # a static cache's unused slots after the real tokens come back False (never attended)
    dense = masks.dense(segment_ids, attention_mask, document_ids, q_len, window, kv_offset, kv_len)
    if implementation == "eager":
        return masks.to_additive(dense, dtype)
    return masks.never_empty(dense)


def _full_length(
    ids: torch.Tensor, name: str, batch_size: int, q_len: int, past: int, device: torch.device, fill: int
) -> torch.Tensor:
    """Ids over all key positions ``[B, past + Q]``; ids given for the new tokens only get ``fill`` for the past."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    ids = ids.to(device=device, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.shape[0] != batch_size or ids.shape[-1] not in (q_len, past + q_len):
        raise ValueError(
            f"{name} has shape {tuple(ids.shape)}; expected [{batch_size}, {q_len}] (new tokens) "
            f"or [{batch_size}, {past + q_len}] (cached + new tokens)"
        )
    if ids.shape[-1] == q_len and past:
        ids = torch.cat([torch.full((batch_size, past), fill, dtype=torch.long, device=device), ids], dim=-1)
    return ids


def _dtype(decoder: nn.Module, kwargs: dict) -> torch.dtype:
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        return embeds.dtype
    return decoder.get_input_embeddings().weight.dtype
