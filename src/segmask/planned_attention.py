"""A plan's kernel calls, run forward and backward as one ``autograd.Function``.

:mod:`segmask.attention_plan` says which calls compute a batch's MAS attention (:class:`Calls`: blocks,
band tiles, reversed squares, self-attending queries); :mod:`segmask.kernels` runs one call and returns its
log-sum-exp. This module runs every call of a plan on a kernel: each call writes its queries' output and
log-sum-exp or merges into them (:func:`_merge`), and the backward gives each call the merged output and
log-sum-exp, from which its share of the gradients is exact (as in ring attention).
:func:`run_calls` is the entry point; :mod:`segmask.fast_attention` chooses the route and the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from segmask import reversed_squares
from segmask.attention_plan import Calls, Squares
from segmask.kernels import Kernel
from segmask.row_plan import Band, Block, split_range


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


def run_calls(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    calls: Calls,
    scale: float,
    size: int,
    kernel: Kernel,
    band_mask: Callable[[Band], Tensor],
) -> Tensor:
    """Attention of ``query [B, H, Q, D]`` over ``key, value [B, Hkv, K, D]`` as ``calls`` on ``kernel``
    (``Hkv < H`` only for a ``grouped`` kernel; the caller repeats the heads for another).

    ``size``: a backward call of a full block takes at most ``2 * size`` keys (which bounds its temporary key
    gradients); ``band_mask(band)``: a band's additive mask. Differentiable in q, k and v; with no graph to
    record (inference mode, no_grad, frozen inputs) the forward runs without autograd, which also keeps
    inference tensors out of ``save_for_backward``."""
    arguments = (query, key, value, calls, scale, size, kernel, band_mask)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
        return _PlannedAttention.forward(_NoGraph(), *arguments)
    return _PlannedAttention.apply(*arguments)
