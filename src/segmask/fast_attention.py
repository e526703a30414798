"""Exact MAS attention without an L x L mask: unmasked and causal kernel calls over contiguous slices.

Under the MAS rule (:func:`segmask.masks.mask_function`) every query sees ONE contiguous key range when
segments, documents and padding are contiguous: a token of a prompt segment sees its document up to the
end of its segment, a causal token its document up to itself. So the mask is a union of rectangles and
causal triangles, each one kernel call (the reversed squares of many short segments batched into few
calls, over every row of the batch), and no call computes a masked pair except inside the diagonal tiles
of a causal square (as causal attention itself does)::

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

That drawing is the plan for a kernel without a mask. With one (torch's CPU flash operators take an
additive mask, as does the reference kernel) a stretch of short segments is cut into tiles of
:data:`BAND` queries instead: one masked call for the diagonal tiles of many (strided views of q, k and
v, no gathers), full blocks for the keys before them, and no reversed squares
(:mod:`segmask.row_plan` draws it).

A query covered by several calls (P and C, C and U, a tile and its blocks) gets their softmaxes merged
through their log-sum-exps, which public ``scaled_dot_product_attention`` does not return; each call
therefore goes to a :class:`segmask.kernels.Kernel` (on CPU the flash-attention operators SDPA itself
dispatches to, which return the log-sum-exp), all inside one ``autograd.Function``. The backward of each
call, given the merged output and log-sum-exp, is exactly that call's share of the gradients (as in ring
attention). Calls have
at most a quarter of the sequence as query rows (blocks 768 where that is at most 3/8 of it), which keeps
the extra memory to a fraction of the output; nothing grows as L x L.

Where this is not exact or not available (a segment id repeated inside a document, padding or a document
split in the middle of a row, dropout, a device without a default kernel, tracing) :func:`mas_attention`
logs the reason once and runs SDPA with the dense mask of :func:`segmask.masks.sdpa_mask` instead.

The calls (which kernel calls, over which rows and ranges) come from :mod:`segmask.attention_plan`; the
kernel that runs each from :mod:`segmask.kernels`; the gathers of the reversed squares from
:mod:`segmask.reversed_squares`; this module runs the calls on the kernel. Pure torch: layers of a
transformers model reach it through :func:`segmask.hook.segmask_attention_forward`, the attention
implementation ``"segmask"``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from segmask import kernels, reversed_squares
from segmask.attention_plan import Calls, Layout, Squares
from segmask.kernels import Kernel
from segmask.row_plan import BAND, PIECE, Band, Block, quarter_rows, split_range

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------- the runner: a plan's calls on a kernel


def _merge(out: Tensor, lse: Tensor, part_out: Tensor, part_lse: Tensor) -> None:
    """Fold a call's softmax over more keys into the running ``out [.., n, D]`` and ``lse [.., n]``, in place.

    The part's share of the joint softmax is ``exp(part_lse) / (exp(lse) + exp(part_lse))``, a sigmoid of
    their difference ``d``, and the joint log-sum-exp is ``lse + softplus(d)`` (both log-sum-exps are finite:
    every query of a call has a key).
    """
    difference = part_lse - lse
    out.lerp_(part_out.to(out.dtype), torch.sigmoid(difference).unsqueeze(-1))
    lse.add_(F.softplus(difference))


@dataclass(frozen=True)
class _Rows:
    """Rows of a call: ``q [b, H, n, D]``, ``k, v [b, H, K, D]``, and the running ``out [b, H, n, D]``
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

    def batch_rows(self, first: int, last: int) -> _Rows:
        """These rows for batch rows ``[first, last)`` (themselves when that is all of them)."""
        if first == 0 and last == self.q.shape[0]:
            return self
        return _Rows(
            *(t[first:last] for t in (self.q, self.k, self.v, self.out, self.lse)), self.q_offset, self.scale
        )


def _block_forward(kernel: Kernel, block: Block, rows: _Rows) -> None:
    """Run one block over its rows and write or merge it into ``rows.out`` and ``rows.lse``."""
    queries, keys = rows.queries(block.q_start, block.q_end), slice(block.k_start, block.k_end)
    part_out, part_lse = kernel.forward(
        rows.q[:, :, queries], rows.k[:, :, keys], rows.v[:, :, keys], block.causal, rows.scale
    )
    if block.merge:
        _merge(rows.out[:, :, queries], rows.lse[:, :, queries], part_out, part_lse)
    else:
        rows.out[:, :, queries] = part_out
        rows.lse[:, :, queries] = part_lse


def _squares_forward(kernel: Kernel, squares: Squares, rows: _Rows) -> None:
    """Run one batch of reversed squares and merge it into ``rows.out`` and ``rows.lse`` at its queries."""
    index, offset = reversed_squares.indices(squares.size, squares.segments, rows.q.device), rows.q_offset
    part_out, part_lse = kernel.forward(
        index.gather(rows.q, "queries", offset),
        index.gather(rows.k, "keys", offset),
        index.gather(rows.v, "keys", offset),
        True,
        rows.scale,
    )
    running_out = index.take(rows.out, "real queries", offset)  # [H, m, D]
    running_lse = index.take(rows.lse, "real queries", offset)
    _merge(running_out, running_lse, index.take(part_out, "squares"), index.take(part_lse, "squares"))
    index.put(rows.out, "real queries", offset, running_out, add=False)
    index.put(rows.lse, "real queries", offset, running_lse, add=False)


def _tiles(x: Tensor, row: int, start: int, count: int, size: int) -> Tensor:
    """Positions ``[start, start + count * size)`` of batch row ``row`` of ``x [B, H, N, ...]`` as a view
    ``[count, H, size, ...]`` (tile ``t`` = positions ``start + t * size ...``), whatever ``x``'s layout."""
    strides = x.stride()
    return x.as_strided(
        (count, x.shape[1], size, *x.shape[3:]),
        (size * strides[2], strides[1], strides[2], *strides[3:]),
        x.storage_offset() + row * strides[0] + start * strides[2],
    )


def _band_views(
    band: Band, rows: _Rows, row: int | None, queries: tuple[Tensor, ...], keys: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """The band's tiles, ``[count, H, size, ...]`` each, in ``queries`` (tensors indexed by query: q, out,
    lse, their gradients) then in ``keys`` (indexed by key position: k, v, theirs): of batch row ``row``, or,
    with ``row`` None (a one-tile band), of every row of ``rows``."""

    def tiles(x: Tensor, start: int) -> Tensor:
        if row is None:
            return x[:, :, start : start + band.size]
        return _tiles(x, row, start, band.count, band.size)

    return (
        *(tiles(x, band.start - rows.q_offset) for x in queries),
        *(tiles(x, band.start) for x in keys),
    )


def _band_forward(kernel: Kernel, band: Band, rows: _Rows, mask: Tensor) -> None:
    """Run a band (one call per batch row, or one for all rows when it is one tile) and write its queries."""
    for row in [None] if band.count == 1 else range(rows.q.shape[0]):
        q, out, lse, k, v = _band_views(band, rows, row, (rows.q, rows.out, rows.lse), (rows.k, rows.v))
        part_out, part_lse = kernel.forward(q, k, v, False, rows.scale, mask.expand(q.shape[0], -1, -1, -1))
        out.copy_(part_out)
        lse.copy_(part_lse)


def _band_backward(
    kernel: Kernel, band: Band, rows: _Rows, mask: Tensor, grad_out: Tensor, grads: tuple[Tensor, ...]
) -> None:
    """Add a band's share of the gradients to ``grads`` (``dq, dk, dv`` of ``rows``)."""
    for row in [None] if band.count == 1 else range(rows.q.shape[0]):
        grad, q, out, lse, grad_q, k, v, grad_k, grad_v = _band_views(
            band, rows, row, (grad_out, rows.q, rows.out, rows.lse, grads[0]), (rows.k, rows.v, *grads[1:])
        )
        parts = kernel.backward(
            grad, q, k, v, out, lse, False, rows.scale, mask.expand(q.shape[0], -1, -1, -1)
        )
        for total, part in zip((grad_q, grad_k, grad_v), parts):
            total += part
        del parts


def _block_backward(
    kernel: Kernel, block: Block, rows: _Rows, grad_out: Tensor, grads: tuple[Tensor, ...], size: int
) -> None:
    """Add one block's share of the gradients to ``grads`` (``dq, dk, dv`` views of its rows).

    The backward of a call given the merged output and log-sum-exp is exactly that call's share; a long key
    range goes in pieces, which bounds the temporary key gradients."""
    grad_q, grad_k, grad_v = grads
    queries = rows.queries(block.q_start, block.q_end)
    pieces = (
        [(block.k_start, block.k_end)] if block.causal else split_range(block.k_start, block.k_end, 2 * size)
    )
    for k_start, k_end in pieces:
        keys = slice(k_start, k_end)
        dq, dk, dv = kernel.backward(
            grad_out[:, :, queries],
            rows.q[:, :, queries],
            rows.k[:, :, keys],
            rows.v[:, :, keys],
            rows.out[:, :, queries],
            rows.lse[:, :, queries],
            block.causal,
            rows.scale,
        )
        grad_q[:, :, queries] += dq
        grad_k[:, :, keys] += dk
        grad_v[:, :, keys] += dv
        del dq, dk, dv  # before the next piece allocates its own


def _squares_backward(
    kernel: Kernel, squares: Squares, rows: _Rows, grad_out: Tensor, grads: tuple[Tensor, ...]
) -> None:
    """Add one batch of reversed squares' share of the gradients to ``grads``."""
    index, offset = reversed_squares.indices(squares.size, squares.segments, rows.q.device), rows.q_offset
    # padding entries: no gradient, and a log-sum-exp that makes their probabilities 0
    dq, dk, dv = kernel.backward(
        index.gather(grad_out, "queries", offset, 0.0),
        index.gather(rows.q, "queries", offset),
        index.gather(rows.k, "keys", offset),
        index.gather(rows.v, "keys", offset),
        index.gather(rows.out, "queries", offset),
        index.gather(rows.lse, "queries", offset, torch.finfo(torch.float32).max),
        True,
        rows.scale,
    )
    for grad, part, entries in (
        (grads[0], dq, "real queries"),
        (grads[1], dk, "real keys"),
        (grads[2], dv, "real keys"),
    ):
        index.put(grad, entries, offset, index.take(part, "squares"), add=True)


def _covering_block(calls: Calls, batch: int, kv_len: int) -> Block | None:
    """The first block of the calls, if it covers every row, query and key."""
    if not calls.blocks:
        return None
    first, last, block = calls.blocks[0]
    spans = (first, last, block.q_start, block.k_start, block.q_end, block.k_end)
    return block if spans == (0, batch, 0, 0, kv_len, kv_len) else None


def _outputs_like(query: Tensor) -> tuple[Tensor, Tensor]:
    """Empty float32 ``out [B, H, Q, D]`` and ``lse [B, H, Q]`` in the memory layout the kernel (and SDPA)
    gives for ``query``: heads-major when ``query`` is, else ``[B, Q, H, D]``, the layout a model's
    ``q_proj(x).view(B, Q, H, D).transpose(1, 2)`` has, so that its transpose back to ``[B, Q, H * D]``
    needs no copy. Kernel outputs then copy and merge into it with contiguous rows."""
    batch, heads, q_len, head_dim = query.shape
    if query.stride(1) >= query.stride(2) or q_len == 1:
        return (
            query.new_empty(batch, heads, q_len, head_dim, dtype=torch.float32),
            query.new_empty(batch, heads, q_len, dtype=torch.float32),
        )
    return (
        query.new_empty(batch, q_len, heads, head_dim, dtype=torch.float32).transpose(1, 2),
        query.new_empty(batch, q_len, heads, dtype=torch.float32).transpose(1, 2),
    )


class _PlannedAttention(torch.autograd.Function):
    """Attention of ``q [B, H, Q, D]`` over ``k, v [B, H, K, D]`` as a plan's kernel calls, forward and backward."""

    @staticmethod
    def forward(ctx, query, key, value, calls, scale, size, kernel, band_mask):
        batch, heads, q_len, head_dim = query.shape
        q_offset = key.shape[2] - q_len
        covering = _covering_block(calls, batch, key.shape[2])
        if covering is not None:  # its output is the whole output: no copy
            out, lse = kernel.forward(query, key, value, covering.causal, scale)
            out = out.float()
        else:
            # every query is written by its first block (or as a self-attending padded query), then merged into
            out, lse = _outputs_like(query)
        everything = _Rows(query, key, value, out, lse, q_offset, scale)
        for first, last, band in calls.bands:  # they write, blocks merge into them
            rows = everything.batch_rows(first, last)
            _band_forward(kernel, band, rows, band_mask(band))
        for first, last, block in calls.blocks[covering is not None :]:
            rows = everything.batch_rows(first, last)
            _block_forward(kernel, block, rows)
        for squares in calls.squares:
            _squares_forward(kernel, squares, everything)
        repeats = heads // value.shape[1]  # grouped-query attention in a grouped kernel
        for first, last, start, end in calls.selfs:  # attends to itself only
            queries = everything.queries(start, end)
            out[first:last, :, queries] = value[first:last, :, start:end].repeat_interleave(repeats, dim=1)
            lse[first:last, :, queries] = 0.0
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.calls, ctx.scale, ctx.size, ctx.kernel, ctx.band_mask = calls, scale, size, kernel, band_mask
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        kernel, calls = ctx.kernel, ctx.calls
        if grad_out.stride(-1) != 1 or 0 in grad_out.stride():
            grad_out = grad_out.contiguous()
        accumulate = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
        covering = _covering_block(calls, query.shape[0], key.shape[2])
        if covering is not None:  # its gradients are the whole gradients, to add the rest to
            grads = kernel.backward(grad_out, query, key, value, out, lse, covering.causal, ctx.scale)
            grads = tuple(g.to(accumulate) for g in grads)
        else:
            grads = tuple(torch.zeros_like(t, dtype=accumulate) for t in (query, key, value))
        q_offset = key.shape[2] - query.shape[2]
        everything = _Rows(query, key, value, out, lse, q_offset, ctx.scale)
        for first, last, band in calls.bands:
            rows = everything.batch_rows(first, last)
            _band_backward(
                kernel,
                band,
                rows,
                ctx.band_mask(band),
                grad_out[first:last],
                tuple(g[first:last] for g in grads),
            )
        for first, last, block in calls.blocks[covering is not None :]:
            rows = everything.batch_rows(first, last)
            _block_backward(
                kernel, block, rows, grad_out[first:last], tuple(g[first:last] for g in grads), ctx.size
            )
        for squares in calls.squares:
            _squares_backward(kernel, squares, everything, grad_out, grads)
        for first, last, start, end in calls.selfs:
            own = grad_out[first:last, :, everything.queries(start, end)]
            grads[2][first:last, :, start:end] += _sum_groups(own, value.shape[1])
        return *(g.to(t.dtype) for g, t in zip(grads, (query, key, value))), None, None, None, None, None


def _sum_groups(x: Tensor, heads: int) -> Tensor:
    """``[B, heads * repeats, ...]`` -> ``[B, heads, ...]``, summed over each head's group (the adjoint of
    ``repeat_interleave(repeats, dim=1)``, which gives query head ``h`` key/value head ``h // repeats``)."""
    if x.shape[1] == heads:
        return x
    return x.unflatten(1, (heads, -1)).sum(2)


class _NoGraph:
    """A stand-in autograd context for forward-only calls: saves nothing."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


# ------------------------------------------------------ the route: the plan on a kernel, or the dense mask


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


def _choose_kernel(query: Tensor, kernel: str | Kernel | None) -> Kernel | str:
    """The kernel to run (``kernel`` itself, the named one, or the device's default), or why there is none.

    A kernel asked for by name that cannot run here raises: only the default falls back."""
    if isinstance(kernel, Kernel):
        return kernel
    try:
        return kernels.select(query.device, kernel)
    except kernels.KernelUnavailable as error:
        if kernel is not None:
            raise
        return str(error)


def _fast_path_blocker(query: Tensor, key: Tensor, value: Tensor, dropout: float) -> str | None:
    """Why the segment-blocked kernel cannot run on these inputs, or None if it can."""
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
    kv_offset = layout.segment_ids.shape[1] - key.shape[2]
    mask = layout.dense(query.shape[2], sliding_window, kv_offset, key.shape[2], query.device)
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa
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
    kernel: str | Kernel | None = None,
) -> torch.Tensor:
    """MAS attention, exactly SDPA with :func:`segmask.masks.sdpa_mask`, without building an L x L mask.

    ``query``: ``[B, Hq, Q, D]``, the last ``Q`` of the ``K`` positions; ``key``, ``value``: ``[B, Hkv, K, D]``
    with ``Hq`` a multiple of ``Hkv`` (grouped-query attention); ``segment_ids``, ``attention_mask`` (1 real,
    0 padding) and ``document_ids``: ``[B, K]``. Returns ``[B, Hq, Q, D]``. A padded query that sees no key
    attends to itself. Differentiable in ``query``, ``key`` and ``value``.

    ``kernel``: a :class:`segmask.kernels.Kernel` or its name (``"cpu-flash"``, ``"reference"``,
    ``"cuda-flash"``); None: the device's default (CPU flash on CPU; elsewhere none, so SDPA with the
    dense mask). A named kernel that cannot run on this device raises.
    """
    layout = Layout(segment_ids, attention_mask, document_ids)  # validates the ids
    return layout_attention(query, key, value, layout, scaling, dropout, kernel)


def layout_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: Layout,
    scaling: float | None = None,
    dropout: float = 0.0,
    kernel: str | Kernel | None = None,
) -> Tensor:
    """:func:`mas_attention` over a :class:`Layout`, whose plan is computed once for all the calls sharing it.
    Under autocast q, k and v take its dtype, as SDPA's do (rotary embeddings give float32 q, k, bf16 v)."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    _check_shapes(query, key, value, layout.segment_ids)
    chosen = _choose_kernel(query, kernel)
    reason = chosen if isinstance(chosen, str) else _fast_path_blocker(query, key, value, dropout)
    calls = None
    if reason is None:
        calls = layout.calls(query.shape[2], PIECE, BAND if chosen.masked else 0)
        if calls is None:
            reason = "a segment id repeats within a document, or padding or a document is not contiguous"
    if reason is not None:
        _log_fallback(reason)
        return dense_attention(query, key, value, layout, scaling, dropout)
    if key.shape[1] != query.shape[1] and not chosen.grouped:
        # grouped-query attention for a kernel that needs as many key/value heads as query heads
        key, value = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (key, value))
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    size = quarter_rows(key.shape[2], PIECE)
    band_mask = functools.partial(layout.band_mask, dtype=query.dtype, device=query.device)
    arguments = (query, key, value, calls, scale, size, chosen, band_mask)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
        # no graph to record (inference mode, no_grad, frozen inputs): run the forward without autograd,
        # which also keeps inference tensors out of save_for_backward
        return _PlannedAttention.forward(_NoGraph(), *arguments)
    return _PlannedAttention.apply(*arguments)
