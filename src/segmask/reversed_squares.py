"""Gathers and scatters of scattered entries of ``[B, H, K, ...]`` tensors: the reversed causal squares of
short segments, batched as one kernel call.

A batch of reversed squares (:class:`segmask.attention_plan.Squares`) reads its queries, keys and values
from ``(row, position)`` entries all over q, k and v, and writes its outputs back to the same entries.
:func:`indices` builds those entries' index tensors once per batch (every layer and step reuses them);
:class:`Reversed` moves tensors in and out of the kernel's ``[count, H, size, ...]`` batch of squares. Each
read or write is one ``index_select`` (or ``index_copy_``) over a 2-D view of a tensor's memory
(:func:`row_view`), whatever its layout, which advanced indexing over batch rows is about 5x slower than on
CPU. Pure torch: no plan, no kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor


def row_view(x: Tensor) -> tuple[Tensor, tuple[int, int, int]] | None:
    """``x [B, H, K, ...]`` as a 2-D view ``[N, inner]`` of its memory (``inner`` = the size of its trailing
    dimension, or 1 without one) and the strides of its batch, head and position dimensions in rows of that
    view; None if ``x``'s strides do not allow such a view.

    One ``index_select`` (or ``index_copy_``) over this view reads (or writes) the entries of any batch row
    in any memory layout (contiguous ``[B, H, K, D]``, the transposed view of ``[B, K, H, D]`` that a model's
    projections give, a slice of a fused projection) without copying ``x`` first, which ``index_select`` on a
    non-contiguous tensor does, and about 5x faster than advanced indexing over batch rows on CPU."""
    inner = x.shape[3] if x.ndim == 4 else 1
    if x.ndim == 4 and inner > 1 and x.stride(3) != 1:
        return None
    strides = [s if n > 1 else 0 for n, s in zip(x.shape[:3], x.stride()[:3])]
    if any(s % inner for s in strides):
        return None
    count = 1 + sum((n - 1) * s for n, s in zip(x.shape[:3], strides)) // inner
    return x.as_strided((count, inner), (inner, 1)), (
        strides[0] // inner,
        strides[1] // inner,
        strides[2] // inner,
    )


def _row_index(strides: tuple[int, int, int], heads: int, first_head: Tensor) -> Tensor:
    """Rows of a :func:`row_view` holding some entries in every head, ``[heads * n]`` head-major, from
    ``first_head`` ``[n]``: the entries' rows in head 0 (``row * strides[0] + position * strides[2]``)."""
    head_rows = torch.arange(heads, device=first_head.device) * strides[1]
    return (head_rows.unsqueeze(1) + first_head.unsqueeze(0)).view(-1)


Where = tuple[Tensor, Tensor]
"""A :func:`row_view` and the rows of it that hold some entries (:func:`_row_index`)."""


def _select(x: Tensor, where: Where) -> Tensor:
    """The entries of ``x [B, H, K, ...]`` at ``where`` -> ``[H, n, ...]`` (contiguous): one ``index_select``."""
    flat, index = where
    return flat.index_select(0, index).view(x.shape[1], -1, *x.shape[3:])


def _scatter(x: Tensor, where: Where, values: Tensor, add: bool) -> None:
    """Write (or with ``add``, add) ``values [H, n, ...]`` into ``x`` at ``where`` (distinct entries)."""
    flat, index = where
    (flat.index_add_ if add else flat.index_copy_)(0, index, values.to(x.dtype).reshape(index.numel(), -1))


def take(x: Tensor, rows: Tensor, positions: Tensor) -> Tensor:
    """``x [B, H, K, ...]`` at the entries ``(rows, positions)`` -> ``[H, n, ...]`` (contiguous): one
    ``index_select`` over a 2-D view of ``x``'s memory (:func:`row_view`), or advanced indexing where
    ``x`` has none."""
    view = row_view(x)
    if view is None:
        return x[rows, :, positions].transpose(0, 1).contiguous()
    flat, strides = view
    return _select(x, (flat, _row_index(strides, x.shape[1], rows * strides[0] + positions * strides[2])))


def put(x: Tensor, rows: Tensor, positions: Tensor, values: Tensor, add: bool) -> None:
    """Write (or with ``add``, add) ``values [H, n, ...]`` into ``x [B, H, K, ...]`` at the entries
    ``(rows, positions)``, which are distinct (as :func:`take`)."""
    view = row_view(x)
    if view is None:
        heads = torch.arange(x.shape[1], device=x.device)
        index = (rows.unsqueeze(1), heads.unsqueeze(0), positions.unsqueeze(1))
        x.index_put_(index, values.transpose(0, 1).to(x.dtype), accumulate=add)
        return
    flat, strides = view
    where = (flat, _row_index(strides, x.shape[1], rows * strides[0] + positions * strides[2]))
    _scatter(x, where, values, add)


@dataclass(frozen=True)
class Reversed:
    """Index tensors of a batch of reversed squares (:class:`segmask.attention_plan.Squares`): its squares
    one after another, each reversed and padded.

    Entries are ``(row, position)`` pairs, ``count * size`` of them; gathered from ``x [B, H, K, ...]`` they
    form ``[count, H, size, ...]``, the kernel's batch of squares. Of each square's entries, the first
    ``end - 1 - start`` are real, the rest padding."""

    rows: Tensor  # [count * size] batch rows
    queries: Tensor  # [count * size] query positions (absolute)
    keys: Tensor  # [count * size] key positions
    padding: Tensor  # [count * size] True where an entry only pads a square
    real: Tensor  # indices of the other entries
    count: int
    size: int
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def where(self, x: Tensor, entries: str, q_offset: int) -> Where | None:
        """The :func:`row_view` of ``x [B, H, K, ...]`` and the rows of it holding ``entries`` (see
        :meth:`entry`), or None where ``x`` has no such view. The entries' rows in head 0 are kept per
        memory layout (every layer and step reuses them; one offset per entry, not per head and entry)."""
        view = row_view(x)
        if view is None:
            return None
        flat, strides = view
        key = (entries, q_offset, strides)
        if key not in self._index:
            rows, positions = self.entry(entries, q_offset)
            self._index[key] = rows * strides[0] + positions * strides[2]
        return flat, _row_index(strides, x.shape[1], self._index[key])

    def entry(self, entries: str, q_offset: int) -> tuple[Tensor, Tensor]:
        """``(rows, positions)`` of ``entries``: ``"queries"`` or ``"keys"`` (every entry, padding included),
        ``"real queries"`` or ``"real keys"`` (the real ones), or ``"squares"`` (the real entries of the
        kernel's ``[count, H, size, ...]``). Query ``i`` is at position ``i - q_offset``."""
        if entries == "squares":
            return self.real // self.size, self.real % self.size
        real, kind = entries.startswith("real "), entries.removeprefix("real ")
        positions = self.queries - q_offset if kind == "queries" else self.keys
        return (self.rows[self.real], positions[self.real]) if real else (self.rows, positions)

    def take(self, x: Tensor, entries: str, q_offset: int = 0) -> Tensor:
        """``x`` at ``entries`` (see :meth:`entry`) -> ``[H, n, ...]``."""
        where = self.where(x, entries, q_offset)
        return take(x, *self.entry(entries, q_offset)) if where is None else _select(x, where)

    def put(self, x: Tensor, entries: str, q_offset: int, values: Tensor, add: bool) -> None:
        """Write (or add) ``values [H, n, ...]`` into ``x`` at ``entries`` (see :meth:`entry`)."""
        where = self.where(x, entries, q_offset)
        if where is None:
            put(x, *self.entry(entries, q_offset), values, add)
        else:
            _scatter(x, where, values, add)

    def gather(self, x: Tensor, entries: str, q_offset: int, fill: float | None = None) -> Tensor:
        """``x [B, H, K, ...]`` at ``entries`` (``"queries"`` or ``"keys"``) -> ``[count, H, size, ...]``, the
        kernel's batch of squares; ``fill`` at the padding."""
        x = self.take(x, entries, q_offset)  # [H, count * size, ...]
        if fill is not None:
            x = x.masked_fill(self.padding.view(-1, *([1] * (x.ndim - 2))), fill)
        return x.view(x.shape[0], self.count, -1, *x.shape[2:]).transpose(0, 1)


@functools.lru_cache(maxsize=256)
def indices(size: int, segments: tuple[tuple[int, int, int], ...], device: torch.device) -> Reversed:
    """The index tensors of squares of side ``size``, one per ``(row, start, end)`` of ``segments`` (its
    queries ``start <= i < end - 1`` against keys ``i < j < end``, reversed), on ``device``: built once per
    batch (every layer and step reuses them)."""
    rows: list[int] = []
    queries: list[int] = []
    keys: list[int] = []
    padding: list[bool] = []
    for row, start, end in segments:
        n = end - 1 - start
        rows += [row] * size
        queries += list(range(end - 2, start - 1, -1)) + [start] * (size - n)
        keys += list(range(end - 1, start, -1)) + [start + 1] * (size - n)
        padding += [False] * n + [True] * (size - n)
    pad = torch.tensor(padding)
    return Reversed(
        *(torch.tensor(t, device=device) for t in (rows, queries, keys)),
        pad.to(device),
        torch.nonzero(~pad).flatten().to(device),
        len(segments),
        size,
    )
