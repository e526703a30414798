"""Exact MAS attention without an L x L mask: unmasked and causal kernel calls over contiguous slices.

Under the MAS rule (:func:`segmask.masks.mask_function`) every query sees ONE contiguous key range when
segments, documents and padding are contiguous: a token of a prompt segment sees its document up to the
end of its segment, a causal token its document up to itself. So the mask is a union of rectangles and
causal triangles, each one call of the CPU flash-attention kernel, and no call computes a masked pair
except inside the diagonal tiles of a causal square (as causal attention itself does)::

    long segments: [0, 0, 1, 1, 1, -1, -1, -1]        short segments: [0, 0, -1, 1, 1, 1, -1, -1]

         kv 0 1 2 3 4 5 6 7                                 kv 0 1 2 3 4 5 6 7
    q 0     A A ⬚ ⬚ ⬚ ⬚ ⬚ ⬚   A, B: a full block per        q 0     C U ⬚ ⬚ ⬚ ⬚ ⬚ ⬚   C: one causal square
      1     A A ⬚ ⬚ ⬚ ⬚ ⬚ ⬚   segment, over its             1     C C ⬚ ⬚ ⬚ ⬚ ⬚ ⬚   over the stretch
      2     B B B B B ⬚ ⬚ ⬚   document up to its end        2     C C C ⬚ ⬚ ⬚ ⬚ ⬚
      3     B B B B B ⬚ ⬚ ⬚                                 3     C C C C U U ⬚ ⬚   U: each segment's
      4     B B B B B ⬚ ⬚ ⬚                                 4     C C C C C U ⬚ ⬚   later tokens, causal
      5     P P P P P C ⬚ ⬚   P: the keys before the        5     C C C C C C ⬚ ⬚   attention on the
      6     P P P P P C C ⬚   causal run, C: its own        6     C C C C C C C ⬚   segment reversed, all
      7     P P P P P C C C   causal square                 7     C C C C C C C C   batched in one call

A query covered by several calls (P and C, C and U) gets their softmaxes merged through their
log-sum-exps, which public ``scaled_dot_product_attention`` does not return; the kernel therefore calls
the CPU flash-attention operators that SDPA itself dispatches to on CPU
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward) inside one ``autograd.Function``.
The backward of each call, given the merged output and log-sum-exp, is exactly that call's share of the
gradients (as in ring attention). Calls have at most a quarter of the sequence as query rows, which keeps
the extra memory to a fraction of the output; nothing grows as L x L.

Where this is not exact or not available (a segment id repeated inside a document, padding or a document
split in the middle of a row, dropout, a non-CPU device, tracing) :func:`mas_attention` logs the reason
once and runs SDPA with the dense mask of :func:`segmask.masks.sdpa_mask` instead.

The plan (which calls, over which ranges) comes from :mod:`segmask.attention_plan`; this module runs it.
Layers of a transformers model reach this through :func:`segmask_attention_forward`, registered as the
attention implementation ``"segmask"`` by :func:`register`; ``segmask.enable`` hands each call the
token-level :class:`Layout`.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from segmask import attention_plan, masks
from segmask.attention_plan import (
    PIECE,
    Block,
    Layout,
    RowGroup,
    Upper,
    block_rows,
    split_range,
)

logger = logging.getLogger(__name__)

_MOVED = ("Plan", "plan_row", "plan_layout")  # to segmask.attention_plan; old path kept for one release


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(
            f"segmask.fast_attention.{name} moved to segmask.attention_plan", DeprecationWarning, stacklevel=2
        )
        return getattr(attention_plan, name)
    raise AttributeError(f"module 'segmask.fast_attention' has no attribute {name!r}")


IMPLEMENTATION = "segmask"
"""Name of the transformers attention implementation registered by :func:`register`."""

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


# ------------------------------------------------------------------------------------------------ kernel


@dataclass(frozen=True)
class _Reversed:
    """Index tensors of an :class:`Upper` group: its squares one after another, each reversed and padded."""

    queries: torch.Tensor  # [count * size] query positions
    keys: torch.Tensor  # [count * size] key positions
    padding: torch.Tensor  # [count * size] True where an entry only pads a square
    real: torch.Tensor  # indices of the other entries
    count: int

    def gather(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [b, H, n, ...]`` at ``positions`` -> ``[b * count, H, size, ...]``."""
        x = x.index_select(2, positions)
        b, h, n = x.shape[:3]
        x = x.reshape(b, h, self.count, n // self.count, *x.shape[3:]).transpose(1, 2)
        return x.reshape(b * self.count, h, n // self.count, *x.shape[4:])

    def fill_padding(self, x: torch.Tensor, value: float) -> torch.Tensor:
        """``x [b * count, H, size, ...]`` with ``value`` at the padding entries."""
        padding = self.padding.view(1, self.count, 1, -1).expand(x.shape[0] // self.count, -1, -1, -1)
        padding = padding.reshape(x.shape[0], 1, -1, *([1] * (x.ndim - 3)))
        return x.masked_fill(padding, value)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """``[b * count, H, size, ...]`` -> ``[b, H, real entries, ...]``, in the order of ``real``."""
        bc, h, size = x.shape[:3]
        x = x.reshape(bc // self.count, self.count, h, size, *x.shape[3:]).transpose(1, 2)
        return x.reshape(bc // self.count, h, self.count * size, *x.shape[4:]).index_select(2, self.real)


@functools.lru_cache(maxsize=256)
def _reversed(upper: Upper) -> _Reversed:
    """The index tensors of ``upper``, built once per group (every layer and step reuses them)."""
    queries: list[int] = []
    keys: list[int] = []
    padding: list[bool] = []
    for start, end in upper.segments:
        n = end - 1 - start
        queries += list(range(end - 2, start - 1, -1)) + [start] * (upper.size - n)
        keys += list(range(end - 1, start, -1)) + [start + 1] * (upper.size - n)
        padding += [False] * n + [True] * (upper.size - n)
    pad = torch.tensor(padding)
    return _Reversed(
        torch.tensor(queries), torch.tensor(keys), pad, torch.nonzero(~pad).flatten(), len(upper.segments)
    )


def _merge(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Fold a call's softmax over more keys into the running ``out [.., n, D]`` and ``lse [.., n]``, in place.

    The part's share of the joint softmax is ``exp(part_lse) / (exp(lse) + exp(part_lse))``, a sigmoid.
    """
    out.lerp_(part_out.to(out.dtype), torch.sigmoid(part_lse - lse).unsqueeze(-1))
    torch.logaddexp(lse, part_lse, out=lse)


@dataclass(frozen=True)
class _Rows:
    """One row group of a call: ``q [b, H, n, D]``, ``k, v [b, H, K, D]``, and the running ``out [b, H, n, D]``
    and ``lse [b, H, n]`` its blocks write or merge into; query ``i`` is key position ``i + q_offset``."""

    q: Tensor
    k: Tensor
    v: Tensor
    out: Tensor
    lse: Tensor
    q_offset: int
    scale: float

    def queries(self, start: int, end: int) -> slice:
        """The query rows of key positions ``[start, end)``."""
        return slice(start - self.q_offset, end - self.q_offset)


def _block_forward(block: Block, rows: _Rows) -> None:
    """Run one block of a row group and write or merge it into ``rows.out`` and ``rows.lse``."""
    queries, keys = rows.queries(block.q_start, block.q_end), slice(block.k_start, block.k_end)
    part_out, part_lse = _FLASH_CPU(
        rows.q[:, :, queries], rows.k[:, :, keys], rows.v[:, :, keys], 0.0, block.causal, scale=rows.scale
    )
    if block.merge:
        _merge(rows.out[:, :, queries], rows.lse[:, :, queries], part_out, part_lse)
    else:
        rows.out[:, :, queries] = part_out
        rows.lse[:, :, queries] = part_lse


def _upper_forward(upper: Upper, rows: _Rows) -> None:
    """Run one group of reversed squares and merge it into ``rows.out`` and ``rows.lse`` at its queries."""
    squares = _reversed(upper)
    positions = squares.queries - rows.q_offset
    part_out, part_lse = _FLASH_CPU(
        squares.gather(rows.q, positions),
        squares.gather(rows.k, squares.keys),
        squares.gather(rows.v, squares.keys),
        0.0,
        True,
        scale=rows.scale,
    )
    index = positions.index_select(0, squares.real)
    running_out, running_lse = rows.out.index_select(2, index), rows.lse.index_select(2, index)
    _merge(running_out, running_lse, squares.scatter(part_out), squares.scatter(part_lse))
    rows.out.index_copy_(2, index, running_out)
    rows.lse.index_copy_(2, index, running_lse)


def _block_backward(
    block: Block, rows: _Rows, grad_out: Tensor, grads: tuple[Tensor, Tensor, Tensor], size: int
) -> None:
    """Add one block's share of the gradients to ``grads`` (``dq, dk, dv`` views of the row group).

    The flash backward of a call given the merged output and log-sum-exp is exactly that call's share; a long
    key range goes in pieces, which bounds the temporary key gradients."""
    grad_q, grad_k, grad_v = grads
    queries = rows.queries(block.q_start, block.q_end)
    pieces = (
        [(block.k_start, block.k_end)] if block.causal else split_range(block.k_start, block.k_end, 2 * size)
    )
    for k_start, k_end in pieces:
        keys = slice(k_start, k_end)
        dq, dk, dv = _FLASH_CPU_BACKWARD(
            grad_out[:, :, queries],
            rows.q[:, :, queries],
            rows.k[:, :, keys],
            rows.v[:, :, keys],
            rows.out[:, :, queries],
            rows.lse[:, :, queries],
            0.0,
            block.causal,
            scale=rows.scale,
        )
        grad_q[:, :, queries] += dq
        grad_k[:, :, keys] += dk
        grad_v[:, :, keys] += dv
        del dq, dk, dv  # before the next piece allocates its own


def _upper_backward(
    upper: Upper, rows: _Rows, grad_out: Tensor, grads: tuple[Tensor, Tensor, Tensor]
) -> None:
    """Add one group of reversed squares' share of the gradients to ``grads``."""
    grad_q, grad_k, grad_v = grads
    squares = _reversed(upper)
    positions = squares.queries - rows.q_offset
    # padding entries: no gradient, and a log-sum-exp that makes their probabilities 0
    dq, dk, dv = _FLASH_CPU_BACKWARD(
        squares.fill_padding(squares.gather(grad_out, positions), 0.0),
        squares.gather(rows.q, positions),
        squares.gather(rows.k, squares.keys),
        squares.gather(rows.v, squares.keys),
        squares.gather(rows.out, positions),
        squares.fill_padding(squares.gather(rows.lse, positions), torch.finfo(torch.float32).max),
        0.0,
        True,
        scale=rows.scale,
    )
    keys = squares.keys.index_select(0, squares.real)
    grad_q.index_add_(2, positions.index_select(0, squares.real), squares.scatter(dq).to(grad_q.dtype))
    grad_k.index_add_(2, keys, squares.scatter(dk).to(grad_k.dtype))
    grad_v.index_add_(2, keys, squares.scatter(dv).to(grad_v.dtype))


def _covering_block(groups: tuple[RowGroup, ...], batch: int, kv_len: int) -> Block | None:
    """The first block of a plan for the whole batch, if it covers every query and key."""
    if len(groups) != 1 or groups[0][:2] != (0, batch) or not groups[0][2].blocks:
        return None
    block = groups[0][2].blocks[0]
    return (
        block if (block.q_start, block.k_start, block.q_end, block.k_end) == (0, 0, kv_len, kv_len) else None
    )


class _PlannedAttention(torch.autograd.Function):
    """Attention of ``q [B, H, Q, D]`` over ``k, v [B, H, K, D]`` as the pieces of a plan, forward and backward."""

    @staticmethod
    def forward(ctx, query, key, value, groups, scale, size):
        batch, heads, q_len, head_dim = query.shape
        q_offset = key.shape[2] - q_len
        covering = _covering_block(groups, batch, key.shape[2])
        if covering is not None:  # its output is the whole output: no copy
            out, lse = _FLASH_CPU(query, key, value, 0.0, covering.causal, scale=scale)
            out = out.float()
        else:
            # the kernel's own layout [B, Q, H, D], so callers that transpose back get a contiguous tensor;
            # every query is written by its first block (or as a self-attending padded query), then merged into
            out = query.new_empty(batch, q_len, heads, head_dim, dtype=torch.float32).transpose(1, 2)
            lse = query.new_empty(batch, q_len, heads, dtype=torch.float32).transpose(1, 2)
        for first, last, plan in groups:
            rows = _Rows(*(t[first:last] for t in (query, key, value, out, lse)), q_offset, scale)
            for block in plan.blocks[covering is not None :]:
                _block_forward(block, rows)
            for upper in plan.uppers:
                _upper_forward(upper, rows)
            for start, end in plan.selfs:  # attends to itself only
                rows.out[:, :, rows.queries(start, end)] = rows.v[:, :, start:end]
                rows.lse[:, :, rows.queries(start, end)] = 0.0
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.groups, ctx.scale, ctx.size = groups, scale, size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        if grad_out.stride(-1) != 1 or 0 in grad_out.stride():
            grad_out = grad_out.contiguous()
        accumulate = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
        covering = _covering_block(ctx.groups, query.shape[0], key.shape[2])
        if covering is not None:  # its gradients are the whole gradients, to add the rest to
            grads = _FLASH_CPU_BACKWARD(
                grad_out, query, key, value, out, lse, 0.0, covering.causal, scale=ctx.scale
            )
            grads = tuple(g.to(accumulate) for g in grads)
        else:
            grads = tuple(torch.zeros_like(t, dtype=accumulate) for t in (query, key, value))
        q_offset = key.shape[2] - query.shape[2]
        for first, last, plan in ctx.groups:
            rows = _Rows(*(t[first:last] for t in (query, key, value, out, lse)), q_offset, ctx.scale)
            group_out, group_grads = grad_out[first:last], tuple(g[first:last] for g in grads)
            for block in plan.blocks[covering is not None :]:
                _block_backward(block, rows, group_out, group_grads, ctx.size)
            for upper in plan.uppers:
                _upper_backward(upper, rows, group_out, group_grads)
            for start, end in plan.selfs:
                group_grads[2][:, :, start:end] += group_out[:, :, rows.queries(start, end)]
        return *(g.to(t.dtype) for g, t in zip(grads, (query, key, value))), None, None, None


# -------------------------------------------------------------------------------------------- public API


@functools.cache
def _log_fallback(reason: str) -> None:
    logger.warning("segmask fast attention: %s; using SDPA with a dense MAS mask", reason)


def _check_shapes(query: Tensor, key: Tensor, value: Tensor, segment_ids: Tensor) -> None:
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            f"query, key and value must be [batch, heads, seq_len, head_dim], got shapes {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in batch, heads or length"
        )
    batch, heads, q_len = query.shape[:3]
    if key.shape[0] != batch or heads % key.shape[1]:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)}: batch must match and query heads must be a "
            f"multiple of key/value heads"
        )
    if q_len > key.shape[2]:
        raise ValueError(
            f"{q_len} queries but only {key.shape[2]} keys; queries are the last positions of the keys"
        )
    if segment_ids.shape != (batch, key.shape[2]):
        raise ValueError(
            f"segment_ids has shape {tuple(segment_ids.shape)}, expected [batch, kv_len] = {[batch, key.shape[2]]}"
        )


def _fast_path_blocker(query: Tensor, key: Tensor, value: Tensor, dropout: float) -> str | None:
    """Why the segment-blocked kernel cannot run on these inputs, or None if it can."""
    if _FLASH_CPU is None or _FLASH_CPU_BACKWARD is None:
        return "this torch has no CPU flash-attention operator"
    if query.device.type != "cpu":
        return f"the segment-blocked kernel runs on CPU only (got {query.device.type})"
    if dropout > 0:
        return "attention dropout is not supported by the segment-blocked kernel"
    if not query.shape[-1] == key.shape[-1] == value.shape[-1]:
        return "query, key and value head dims differ"
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return "tracing or compiling"
    return None


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: Layout,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The reference route: SDPA with the dense ``[B, 1, Q, K]`` MAS mask (optionally within a sliding window).

    Same shapes as :func:`mas_attention`; for a sliding window the key positions are the last ``key.shape[2]``
    of the ``K`` positions the layout's ids cover.
    """
    segment_ids, attention_mask, document_ids = layout.segment_ids, layout.attention_mask, layout.document_ids
    kv_offset = segment_ids.shape[1] - key.shape[2]
    mask = masks.dense(
        segment_ids, attention_mask, document_ids, query.shape[2], sliding_window, kv_offset, key.shape[2]
    )
    mask = masks.never_empty(mask)
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask.to(query.device),
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )


def mas_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """MAS attention, exactly SDPA with :func:`segmask.masks.sdpa_mask`, without building an L x L mask.

    ``query``: ``[B, Hq, Q, D]``, the last ``Q`` of the ``K`` positions; ``key``, ``value``: ``[B, Hkv, K, D]``
    with ``Hq`` a multiple of ``Hkv`` (grouped-query attention); ``segment_ids``, ``attention_mask`` (1 real,
    0 padding) and ``document_ids``: ``[B, K]``. Returns ``[B, Hq, Q, D]``. A padded query that sees no key
    attends to itself. Differentiable in ``query``, ``key`` and ``value``.
    """
    layout = Layout(segment_ids, attention_mask, document_ids)  # validates the ids
    return layout_attention(query, key, value, layout, scaling, dropout)


def layout_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: Layout,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """:func:`mas_attention` over a :class:`Layout`, whose plan is computed once for all the calls sharing it."""
    _check_shapes(query, key, value, layout.segment_ids)
    reason = _fast_path_blocker(query, key, value, dropout)
    groups = None
    if reason is None:
        groups = layout.plan(query.shape[2], PIECE)
        if groups is None:
            reason = "a segment id repeats within a document, or padding or a document is not contiguous"
    if reason is not None:
        _log_fallback(reason)
        return dense_attention(query, key, value, layout, scaling, dropout)
    repeats = query.shape[1] // key.shape[1]
    if repeats > 1:
        key, value = (
            t.unsqueeze(2).expand(-1, -1, repeats, -1, -1).flatten(1, 2) for t in (key, value)
        )  # grouped-query attention: each key/value head serves `repeats` query heads
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    size = block_rows(key.shape[2], PIECE)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
        # no graph to record (inference mode, no_grad, frozen inputs): run the forward without autograd,
        # which also keeps inference tensors out of save_for_backward
        return _PlannedAttention.forward(_NoGraph(), query, key, value, groups, scale, size)
    return _PlannedAttention.apply(query, key, value, groups, scale, size)


class _NoGraph:
    """A stand-in autograd context for forward-only calls: saves nothing."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


def segmask_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention implementation ``"segmask"`` (signature of ``sdpa_attention_forward``).

    With ``segmask_layout`` (a :class:`Layout` over all ``K`` key positions, set by ``segmask.enable``) it
    runs :func:`mas_attention` and ignores ``attention_mask`` (a placeholder); sliding-window layers take the
    dense route with the window applied. Without it, it is transformers' ``sdpa_attention_forward``.
    Returns ``attn_output [B, Q, Hq, D]`` and no attention weights.
    """
    layout = kwargs.pop("segmask_layout", None)
    if layout is None:
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
    """Register ``"segmask"`` with transformers: the attention function and, for calls without a layout
    (plain causal forward, decoding without segment ids), transformers' own ``sdpa_mask``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, segmask_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
