"""The segment-blocked plan of a forward call: a batch's rows planned, grouped and turned into kernel calls.

Each row's plan (:func:`segmask.row_plan.plan_row`: full blocks, causal blocks, band tiles, reversed
squares, drawn there) is pure Python over its ids. :func:`plan_layout` plans a batch (consecutive rows
sharing a plan grouped; where every row has the same blocks, planned for the whole batch, so that a causal
stretch over every query and key is one call); :func:`batch_calls` turns the batch's plans into as few
kernel calls as it can (a block shared by neighbouring rows runs once over them; the reversed squares of
every row go in a few padded batches); :class:`Layout` carries one forward call's ids and computes its
plan, calls and masks once for every layer. :mod:`segmask.planned_attention` runs the calls on a kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from segmask import masks
from segmask.row_plan import PIECE, Band, Block, Plan, plan_row, quarter_rows, square_batches


@dataclass(frozen=True, eq=False)
class Layout:
    """Token-level ids of one forward call, over all key positions (cached + current tokens).

    ``segment_ids``: ``[B, K]`` long, ``>= 0`` bidirectional segment, ``-1`` causal token;
    ``attention_mask``: ``[B, K]`` (1 real, 0 padding) or None; ``document_ids``: ``[B, K]`` or None.
    Compared by identity; :meth:`plan` remembers its plans, so build one layout per forward call.
    """

    segment_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    key_lengths: dict[int | None, int] | None = None
    """How many keys each layer kind holds, by sliding window (None: full attention), as the KV cache
    reported them when the mask was built; None: exactly ``K``. The kernel refuses any other count."""

    _plans: dict[tuple[int, int, int], tuple[RowGroup, ...] | None] = field(
        default_factory=dict, init=False, repr=False
    )
    _calls: dict[tuple[int, int, int], Calls | None] = field(default_factory=dict, init=False, repr=False)
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        masks.validate_layout(self.segment_ids, self.attention_mask, self.document_ids)

    def plan(self, q_len: int, piece: int = PIECE, band: int = 0) -> tuple[RowGroup, ...] | None:
        """:func:`plan_layout` of these ids for the last ``q_len`` queries, computed once: every layer of the
        forward call that built this layout shares it."""
        if (q_len, piece, band) not in self._plans:
            self._plans[(q_len, piece, band)] = plan_layout(
                self.segment_ids, self.attention_mask, self.document_ids, q_len, piece, band
            )
        return self._plans[(q_len, piece, band)]

    def calls(self, q_len: int, piece: int = PIECE, band: int = 0) -> Calls | None:
        """:func:`batch_calls` of :meth:`plan`, computed once for every layer of the forward call.

        A call of reversed squares holds at most a quarter of a block's rows per batch row, and at least
        ``piece``: its gathered queries, keys and values stay a few percent of the output's memory (the
        batch's squares grow the number of calls, not the peak)."""
        if (q_len, piece, band) not in self._calls:
            groups = self.plan(q_len, piece, band)
            batch, kv_len = self.segment_ids.shape
            budget = max(piece, batch * quarter_rows(kv_len, piece) // 4)
            self._calls[(q_len, piece, band)] = None if groups is None else batch_calls(groups, budget)
        return self._calls[(q_len, piece, band)]

    def band_mask(self, band: Band, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """:meth:`Band.mask` as the additive mask its kernel call takes, ``[count, 1, size, size]`` (0 seen,
        the dtype's minimum hidden) in ``dtype`` on ``device``: each query's row of it picked from a table of the
        ``size + 1`` possible rows. The picks (:meth:`Band.reach`, 8 bytes a query) are kept for every layer
        of the forward call, the mask (4 bytes a pair in float32) is made anew for each call, so that one
        call's worth of it is alive at a time; picking rows costs a tenth of filling a mask."""
        key = ("band", band, torch.device(device))
        if key not in self._masks:
            self._masks[key] = band.reach().flatten().to(device)
        rows = _band_rows(band.size, dtype, torch.device(device))
        return rows.index_select(0, self._masks[key]).view(band.count, 1, band.size, band.size)

    def dense(
        self, q_len: int, window: int | None, kv_offset: int, kv_len: int, device: torch.device
    ) -> torch.Tensor:
        """The SDPA mask :func:`segmask.masks.dense` ``[B, 1, Q, kv_len]`` (empty rows made safe) on ``device``,
        built once: every layer of the forward call with this window shares it."""
        key = (q_len, window, kv_offset, kv_len, torch.device(device))
        if key not in self._masks:
            mask = masks.dense(
                self.segment_ids, self.attention_mask, self.document_ids, q_len, window, kv_offset, kv_len
            )
            self._masks[key] = masks.never_empty(mask).to(device)
        return self._masks[key]

    def check_keys(self, keys: int, window: int | None) -> None:
        """Raise unless a layer (with sliding ``window`` or None) holding ``keys`` keys is what the mask is for."""
        expected = self.segment_ids.shape[1] if self.key_lengths is None else self.key_lengths.get(window)
        if expected is None:
            raise ValueError(f"the MAS layout was built for no layer with sliding window {window}")
        if keys != expected:
            raise ValueError(
                f"the MAS mask was built for {expected} keys (the KV cache's length when the mask was made) but "
                f"the attention layer has {keys} keys; the cache and the mask disagree, so segmask refuses to run"
            )


@functools.lru_cache(maxsize=16)
def _band_rows(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[size + 1, size]`` additive rows (:func:`segmask.masks.to_additive`, as the dense route's mask): row
    ``n`` sees the first ``n`` keys and hides the rest (row 0 is never picked: a query sees itself)."""
    seen = torch.arange(size, device=device) < torch.arange(size + 1, device=device).unsqueeze(1)
    return masks.to_additive(seen, dtype)


RowGroup = tuple[int, int, Plan]
"""Rows ``[first, last)`` of a batch that share one plan."""


@dataclass(frozen=True)
class Squares:
    """Reversed causal squares (see :class:`segmask.row_plan.Upper`) of short segments of any rows, in one batched call: each
    ``(row, start, end)`` of ``segments`` a square of side ``size``, padded at its end."""

    size: int
    segments: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Calls:
    """The kernel calls that compute a batch's plans.

    ``blocks``: ``(first, last, block)``, the block over rows ``[first, last)``; every block that writes its
    queries (``merge`` False) comes before any that merges into them. ``squares``: batched reversed squares,
    merged after the blocks. ``selfs``: ``(first, last, start, end)``, queries of rows ``[first, last)`` that
    attend to their own position only.
    """

    blocks: tuple[tuple[int, int, Block], ...]
    squares: tuple[Squares, ...] = ()
    selfs: tuple[tuple[int, int, int, int], ...] = ()
    bands: tuple[tuple[int, int, Band], ...] = ()
    """``(first, last, band)``: the band over rows ``[first, last)``; bands write their queries (before any
    block merges into them): one call per row, or one for all rows where the band is one tile."""

    def count(self) -> int:
        """Kernel calls of a forward pass."""
        bands = sum(1 if band.count == 1 else last - first for first, last, band in self.bands)
        return len(self.blocks) + len(self.squares) + bands


def plan_layout(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    q_len: int,
    piece: int | None = None,
    band: int = 0,
) -> tuple[RowGroup, ...] | None:
    """Plans for a batch (``[B, K]`` ids), consecutive rows with one layout grouped; None if any row has none."""
    segment_ids = segment_ids.cpu()
    attention_mask = None if attention_mask is None else attention_mask.cpu()
    document_ids = None if document_ids is None else document_ids.cpu()
    groups: list[RowGroup] = []
    for b in range(segment_ids.shape[0]):
        plan = plan_row(
            segment_ids[b], _row(attention_mask, b), _row(document_ids, b), q_len, piece, False, band
        )
        if plan is None:
            return None
        if groups and groups[-1][2] == plan:
            groups[-1] = (groups[-1][0], b + 1, plan)
        else:
            groups.append((b, b + 1, plan))
    first = groups[0][2]
    if all((p.blocks, p.selfs) == (first.blocks, first.selfs) for _, _, p in groups):
        # every row has the same blocks (rows may differ in their short segments): plan them for the whole
        # batch, where a causal stretch over every query and key is one call
        groups = [
            (
                a,
                b,
                plan_row(
                    segment_ids[a], _row(attention_mask, a), _row(document_ids, a), q_len, piece, True, band
                ),
            )
            for a, b, _ in groups
        ]
    return tuple(groups)


def batch_calls(groups: tuple[RowGroup, ...], budget: int) -> Calls:
    """The kernel calls of a batch's plans: the same block in neighbouring row groups becomes one call over
    their rows, and the reversed squares of every row are batched anew, at most ``budget`` queries per call
    (summed over rows). Blocks that write come before blocks that merge, so each query is written once
    (by its one non-merging block or as a self-attending query) before anything merges into it."""
    ranges: dict[Block, list[list[int]]] = {}
    for first, last, plan in groups:
        for block in plan.blocks:
            spans = ranges.setdefault(block, [])
            if spans and spans[-1][1] == first:
                spans[-1][1] = last
            else:
                spans.append([first, last])
    blocks = [(a, b, block) for block, spans in ranges.items() for a, b in spans]
    blocks.sort(key=lambda call: call[2].merge)  # stable: writes first, in plan order
    segments = [
        (row, start, end)
        for first, last, plan in groups
        for upper in plan.uppers
        for start, end in upper.segments
        for row in range(first, last)
    ]
    squares = tuple(Squares(size, group) for size, group in square_batches(segments, budget))
    selfs = tuple((first, last, start, end) for first, last, plan in groups for start, end in plan.selfs)
    bands: list[tuple[int, int, Band]] = []
    for first, last, plan in groups:
        for band in plan.bands:
            previous = next((i for i, call in enumerate(bands) if call[2] == band and call[1] == first), None)
            if previous is None:
                bands.append((first, last, band))
            else:
                bands[previous] = (bands[previous][0], last, band)
    return Calls(tuple(blocks), squares, selfs, tuple(bands))


def _row(ids: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """Row ``b`` of optional ``[B, K]`` ids."""
    return None if ids is None else ids[b]
