"""One row's segment-blocked plan: which query ranges see which key ranges, from the row's token-level ids.

Pure and device-independent (Python over the ids, moved to CPU): no kernel, no model. Under the MAS rule
(:func:`segmask.masks.mask_function`) every query sees ONE contiguous key range when segments, documents
and padding are contiguous, so one row's attention is a union of rectangles and causal triangles: a
:class:`Plan` of :class:`Block` s (each one unmasked or causal kernel call, exactly a varlen kernel's
``(q_start, q_end, k_start, k_end)`` range) and :class:`Upper` groups of reversed causal squares for the
later tokens of short segments::

    segment_ids [0, 0, 0, 1, 1, 1, -1, -1, -1], piece 3:

         kv 0 1 2 3 4 5 6 7 8
    q 0     A A A ⬚ ⬚ ⬚ ⬚ ⬚ ⬚   A  Block(0, 3, 0, 3)
      1     A A A ⬚ ⬚ ⬚ ⬚ ⬚ ⬚
      2     A A A ⬚ ⬚ ⬚ ⬚ ⬚ ⬚
      3     B B B B B B ⬚ ⬚ ⬚   B  Block(3, 6, 0, 6)
      4     B B B B B B ⬚ ⬚ ⬚
      5     B B B B B B ⬚ ⬚ ⬚
      6     P P P P P P C ⬚ ⬚   P  Block(6, 9, 0, 6)
      7     P P P P P P C C ⬚   C  Block(6, 9, 6, 9, causal=True, merge=True)
      8     P P P P P P C C C

Short segments with a kernel that takes a mask (``band`` > 0, the CPU flash and reference kernels): a
causal stretch with short segments is cut into tiles of ``band`` queries instead. Each tile's queries
against the tile's own keys are one masked :class:`Band` call for many tiles (the tiles equally spaced, so
strided views of q, k and v), the keys before a group of tiles one full block, and a segment crossing a
tile's end one small full block over its keys beyond::

    segment_ids [0, 0, -1, 1, 1, 1, -1, -1], band 4:

         kv 0 1 2 3 4 5 6 7
    q 0     T T ⬚ ⬚ ⬚ ⬚ ⬚ ⬚   T  Band(0, 4, 1, ((0, 2), (3, 6))) and Band(4, 4, 1, ((3, 6),)): the
      1     T T ⬚ ⬚ ⬚ ⬚ ⬚ ⬚      tiles [0, 4) and [4, 8) (one call for both at real sizes), their mask
      2     T T T ⬚ ⬚ ⬚ ⬚ ⬚      hides each query's later keys outside its segment
      3     T T T T X X ⬚ ⬚   X  Block(3, 4, 4, 6, merge=True): segment (3, 6) beyond the tile
      4     P P P P T T ⬚ ⬚   P  Block(4, 8, 0, 4, merge=True): the keys before the tile
      5     P P P P T T ⬚ ⬚
      6     P P P P T T T ⬚
      7     P P P P T T T T

The kernel time of these calls is the causal call's (whose kernel also computes whole diagonal tiles),
given long enough calls: blocks have at least :data:`LONG_CALL` rows where memory allows (from 2,048 keys),
the size from which the CPU flash kernel runs its faster query blocks. The reversed squares (``band`` 0,
for kernels without a mask) cost more: many small calls, each computing its whole square, and the gathers
around them (``benchmarks/RESULTS-archive.md``, "Band tiles, idle cores").

:func:`plan_row` plans one row; :mod:`segmask.attention_plan` plans a batch of rows and turns their plans
into kernel calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PIECE = 256
"""Segments with at least this many queries are computed as full blocks, shorter ones as band tiles (or,
for a kernel without a mask, reversed causal squares); blocks have at least this many query rows (the CPU
flash kernel's query block)."""

BAND = 256
"""Queries per tile of a :class:`Band` (the diagonal tiles of a stretch of short segments, one masked call)."""


@dataclass(frozen=True)
class Block:
    """Queries ``[q_start, q_end)`` against keys ``[k_start, k_end)`` (absolute positions): each query sees
    every key, or, when ``causal``, the two ranges coincide and query ``i`` sees keys ``<= i``. ``merge``:
    an earlier block of the plan already covers these queries (over other keys)."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool = False
    merge: bool = False


@dataclass(frozen=True)
class Upper:
    """The later tokens of short segments, computed as causal attention in reversed order.

    Each ``(start, end)`` in ``segments``: queries ``start <= i < end - 1`` also see keys ``i < j < end``.
    Reversed (query ``end - 2 - r``, key ``end - 1 - c``) that is ``c <= r``: a causal square, padded at its
    end to ``size`` (padding never reaches a real query), all squares of the group in one batched call.
    """

    size: int
    segments: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Band:
    """The diagonal tiles of a causal stretch with short segments: ``count`` tiles of ``size`` queries from
    ``start``, each query against the keys of its own tile, in ONE masked call (the tiles equally spaced,
    so they are strided views of q, k and v, no copy).

    In tile ``[a, a + size)`` query ``i`` sees key ``j`` iff ``j <= i``, or ``i`` and ``j`` lie in one of
    the short ``segments`` (``(start, end)``, a segment may begin before the tile or end after it). The
    keys a tile's queries see beyond it (a segment crossing its end) and before it are full blocks."""

    start: int
    size: int
    count: int
    segments: tuple[tuple[int, int], ...]

    @property
    def end(self) -> int:
        return self.start + self.count * self.size

    def reach(self) -> torch.Tensor:
        """How many keys of its tile each query sees, ``[count, size]`` long in ``[1, size]``: the tile's
        first keys up to the query itself (a causal query) or to its segment's end, pure."""
        ends = torch.arange(self.start + 1, self.end + 1)  # end(i): i + 1 for a causal query
        for start, end in self.segments:
            ends[max(start, self.start) - self.start : min(end, self.end) - self.start] = end
        tile_starts = torch.arange(self.start, self.end, self.size).unsqueeze(1)
        return (ends.view(self.count, self.size) - tile_starts).clamp_(max=self.size)

    def mask(self) -> torch.Tensor:
        """Which key of its tile each query does NOT see: ``[count, size, size]`` bool (True: hidden), pure."""
        return torch.arange(self.size) >= self.reach().unsqueeze(-1)


@dataclass(frozen=True)
class Plan:
    """One row's attention as disjoint pieces. Each query's keys are the union of its pieces' keys;
    ``selfs`` are query ranges that see no key (padding) and attend to their own position only."""

    blocks: tuple[Block, ...]
    uppers: tuple[Upper, ...] = ()
    selfs: tuple[tuple[int, int], ...] = ()
    bands: tuple[Band, ...] = ()


@dataclass(frozen=True)
class _Run:
    """Consecutive positions ``[start, end)`` with one region (0 left padding, 1 real, 2 right padding),
    one document id and one segment id."""

    start: int
    end: int
    region: int
    document: int
    segment: int


def _runs(
    segment_ids: torch.Tensor, document_ids: torch.Tensor, first_real: int, end_real: int
) -> list[_Run]:
    """Split one row (``[K]`` tensors) into maximal runs of equal (region, document, segment)."""
    kv_len = segment_ids.numel()
    change = (segment_ids[1:] != segment_ids[:-1]) | (document_ids[1:] != document_ids[:-1])
    starts = set((torch.nonzero(change).flatten() + 1).tolist()) | {0, first_real, end_real}
    starts = sorted(s for s in starts if s < kv_len)
    index = torch.tensor(starts, device=segment_ids.device)
    segments = segment_ids[index].tolist()
    documents = document_ids[index].tolist()
    ends = starts[1:] + [kv_len]
    regions = [0 if s < first_real else 1 if s < end_real else 2 for s in starts]
    return [_Run(*fields) for fields in zip(starts, ends, regions, documents, segments)]


LONG_CALL = 768
"""Query rows from which torch's CPU flash kernel splits a call's queries into blocks of 256 rather than 64
(``q_seq_len >= 768`` in ATen's ``FlashAttentionKernel.cpp``): such calls run faster per query-key pair,
by 7-11 % in one call timed alone and by about 25 % inside the fast path on 2 threads (1.60 ns a pair at
768 rows against 1.96-2.18 at 256-616 rows; ``benchmarks/RESULTS.md``, "Long calls" and "Drift-proof
rounds, idle cores"). Where that is at most 3/8 of the keys (from 2,048 keys on),
blocks may have this many rows: their temporary output is then at most 9.4 % of the memory of q, k, v and
the output."""


def quarter_rows(kv_len: int, piece: int) -> int:
    """A quarter of the keys, at least ``piece``: the most query rows of a band call and half the most keys
    of one backward call, which bounds their temporary memory."""
    return max(piece, -(-kv_len // 4))


def block_rows(kv_len: int, piece: int) -> int:
    """Most query rows of a block's kernel call: :func:`quarter_rows`, and at least :data:`LONG_CALL` where
    that is at most 3/8 of the keys."""
    return max(quarter_rows(kv_len, piece), LONG_CALL if 8 * LONG_CALL <= 3 * kv_len else 0)


def split_range(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into balanced pieces of at most ``size``."""
    count = -(-(end - start) // size)
    bounds = [start + (end - start) * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def block_pieces(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """Query rows ``[start, end)`` cut into the rows of block calls of at most ``size`` rows: balanced
    pieces, unless those would fall below :data:`LONG_CALL` rows where ``size`` allows that many; then
    pieces of ``LONG_CALL`` rows and one shorter remainder (1,229 rows: 768 + 461, not 615 + 614), as
    calls of ``LONG_CALL`` rows or more run faster per pair (about 25 % faster than 615 rows on 2 threads,
    ``benchmarks/RESULTS.md``)."""
    pieces = split_range(start, end, size)
    if size < LONG_CALL or end - start <= size or pieces[0][1] - pieces[0][0] >= LONG_CALL:
        return pieces
    bounds = [*range(start, end, LONG_CALL), end]
    return list(zip(bounds[:-1], bounds[1:]))


def _padded_size(n: int) -> int:
    """``n`` rounded up to a multiple of 8 (of 16 from 128 on, ...): the side of its batched square."""
    step = 1 << max(3, n.bit_length() - 4)
    return -(-n // step) * step


def _square_size(segments: list[tuple[int, int]]) -> int:
    """Side of the batched squares of these segments (``end - 1 - start`` queries each)."""
    return _padded_size(max(end - 1 - start for start, end in segments))


def square_batches(segments: list[tuple], budget: int) -> list[tuple[int, tuple]]:
    """Batch the reversed squares of short segments (tuples ending in ``start, end``), largest first, each
    batch padded to its largest square and holding at most ``budget`` queries (or one square), which bounds
    the memory of its gathered queries, keys and values: ``(side, segments)`` per batch."""
    batches: list[tuple[int, tuple]] = []
    group: list[tuple] = []
    for segment in sorted(segments, key=lambda s: s[-2] - s[-1]):
        if group and (len(group) + 1) * _square_size([s[-2:] for s in group]) > budget:
            batches.append((_square_size([s[-2:] for s in group]), tuple(group)))
            group = []
        group.append(segment)
    if group:
        batches.append((_square_size([s[-2:] for s in group]), tuple(group)))
    return batches


def _group_uppers(segments: list[tuple[int, int]], budget: int) -> tuple[Upper, ...]:
    """One row's reversed squares in batches of at most ``budget`` queries (see :func:`square_batches`)."""
    return tuple(Upper(size, group) for size, group in square_batches(segments, budget))


def _spans(runs: list[_Run]) -> tuple[dict[int, list[int]], dict[tuple[int, int], tuple[int, int]]] | None:
    """Where each document and each (document, segment) lies among the real tokens, as ``[start, end)``; None
    if a document is split by another one or a segment id repeats inside a document."""
    documents: dict[int, list[int]] = {}
    segments: dict[tuple[int, int], tuple[int, int]] = {}
    previous = None
    for run in runs:
        if run.region != 1:
            continue
        if run.document != previous:
            if run.document in documents:
                return None  # a document split by another one
            documents[run.document] = [run.start, run.end]
            previous = run.document
        documents[run.document][1] = run.end
        if run.segment >= 0:
            if (run.document, run.segment) in segments:
                return None  # a segment id repeated inside a document
            segments[(run.document, run.segment)] = (run.start, run.end)
    return documents, segments


@dataclass
class _Pieces:
    """One row's pieces, collected as :func:`plan_row` walks its runs. ``size``: most query rows of a block;
    ``quarter``: of a band call; ``whole``: the plan serves the whole batch; ``stretch``: (first query,
    document start) of the open causal stretch."""

    kv_len: int
    q_len: int
    size: int
    quarter: int
    whole: bool
    band: int = 0
    blocks: list[Block] = field(default_factory=list)
    uppers: list[tuple[int, int]] = field(default_factory=list)
    selfs: list[tuple[int, int]] = field(default_factory=list)
    bands: list[Band] = field(default_factory=list)
    stretch: tuple[int, int] | None = None

    def full(self, start: int, end: int, k_start: int, k_end: int) -> None:
        """Queries ``[start, end)`` that each see every key of ``[k_start, k_end)``."""
        self.blocks.extend(Block(a, b, k_start, k_end) for a, b in block_pieces(start, end, self.size))

    def open(self, start: int, doc_start: int) -> None:
        """Open a causal stretch at query ``start`` of the document from ``doc_start``, unless one is open."""
        if self.stretch is None:
            self.stretch = (start, doc_start)

    def close(self, end: int) -> None:
        """End the open causal stretch (if any) before ``end``: causal blocks, each over the keys before it too."""
        if self.stretch is None:
            return
        first, doc_start = self.stretch
        self.stretch = None
        if self.uppers and self.uppers[-1] == (first, end):
            # the stretch is one short segment (no causal token): its queries all see [doc_start, end), one
            # full block, with no causal square and no reversed square to merge
            self.uppers.pop()
            self.full(first, end, doc_start, end)
            return
        if self.band:
            # this stretch's short segments are the last ones recorded
            shorts = [segment for segment in self.uppers if segment[0] >= first]
            if shorts:
                del self.uppers[len(self.uppers) - len(shorts) :]
                self.tiles(first, end, doc_start, shorts)
                return
        if self.whole and first == doc_start == 0 and end == self.kv_len == self.q_len:
            self.blocks.append(Block(0, self.kv_len, 0, self.kv_len, causal=True))
            return
        for a, b in block_pieces(first, end, self.size):
            if a > doc_start:
                self.blocks.append(Block(a, b, doc_start, a))
            self.blocks.append(Block(a, b, a, b, causal=True, merge=a > doc_start))

    def tiles(self, first: int, end: int, doc_start: int, shorts: list[tuple[int, int]]) -> None:
        """The causal stretch ``[first, end)`` with short segments ``shorts`` as :class:`Band` tiles of
        ``band`` queries (the last one shorter, a band of its own), plus full blocks that merge into each
        tile: the keys before it and, for a segment crossing the tile's end, that segment's keys after it."""
        size = self.band
        count = (end - first) // size
        tiles = [(first + m * size, first + (m + 1) * size) for m in range(count)]
        if first + count * size < end:
            tiles.append((first + count * size, end))
        # one band call per run of tiles of at most a quarter of the keys (which bounds its temporary
        # memory); the tiles in groups of at most a block's rows, each with one full block over the keys
        # before it (long calls run faster per pair than short ones), then for each later tile of the group
        # one over the group's keys before that tile. The first group takes the remainder, so that the
        # later groups, whose blocks over the keys before them are the longest, have all their rows.
        per_band = max(1, self.quarter // size)
        for m in range(0, count, per_band):
            self.add_band(tiles[m : min(m + per_band, count)], shorts)
        if len(tiles) > count:
            self.add_band(tiles[count:], shorts)
        per_group = max(1, self.size // size)
        bounds = list(range(count, 0, -per_group))[::-1]
        groups = [tiles[m:n] for m, n in zip([0, *bounds[:-1]], bounds)]
        if len(tiles) > count:
            groups.append(tiles[count:])
        for group in groups:
            start = group[0][0]
            if start > doc_start:
                self.blocks.append(Block(start, group[-1][1], doc_start, start, merge=True))
            for a, b in group:
                if a > start:
                    self.blocks.append(Block(a, b, start, a, merge=True))
                self.blocks.extend(Block(max(s, a), b, b, e, merge=True) for s, e in shorts if s < b < e)

    def add_band(self, tiles: list[tuple[int, int]], shorts: list[tuple[int, int]]) -> None:
        """One :class:`Band` of these equal, consecutive ``tiles`` (``(start, end)`` each)."""
        start, stop = tiles[0][0], tiles[-1][1]
        inside = tuple(s for s in shorts if s[0] < stop and s[1] > start)
        self.bands.append(Band(start, tiles[0][1] - start, len(tiles), inside))

    def plan(self, upper_budget: int) -> Plan:
        return Plan(
            tuple(self.blocks),
            _group_uppers(self.uppers, upper_budget),
            tuple(self.selfs),
            tuple(self.bands),
        )


def plan_row(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    q_len: int,
    piece: int | None = None,
    whole: bool = False,
    band: int = 0,
) -> Plan | None:
    """Pieces of one row (``[K]`` tensors), or None where some query's keys are not one contiguous range.

    Fast-path layouts: real tokens contiguous (padding only at the ends), each document one contiguous run
    of real tokens, and each segment id ``>= 0`` one contiguous run inside its document. A real query ``i``
    then sees ``[doc_start, end(i))``, ``end(i)`` the end of its segment or ``i + 1`` for a causal token:

    - a long segment (``>= piece`` queries): full blocks over ``[doc_start, segment_end)``;
    - a short segment alone in its stretch (neither a causal token nor another short segment before the
      next long segment, padding or the document's end): full blocks over ``[doc_start, segment_end)``;
    - any other stretch of the document: with ``band`` (a kernel that takes a mask), where it holds a short
      segment, :class:`Band` tiles of ``band`` queries and the full blocks merged into them (see the
      module docstring); otherwise causal blocks, each a full block over the keys before it and a causal
      square over its own rows, plus an :class:`Upper` square for each short segment's later tokens.

    Blocks have at most :func:`block_rows` query rows (``max(piece, K / 4)``, at least 768 from 2,048 keys
    on), band calls at most :func:`quarter_rows` (``max(piece, K / 4)``) and reversed-square calls at most a
    quarter of that, which bounds the temporary memory of a call. Except with ``whole`` (the plan serves the
    whole batch): a causal stretch over every query and key is then one block, whose output is the whole
    output.
    """
    kv_len = segment_ids.numel()
    q_start = kv_len - q_len
    piece = PIECE if piece is None else piece
    size = block_rows(kv_len, piece)
    if attention_mask is None:
        first_real, end_real = 0, kv_len
    else:
        real = torch.nonzero(attention_mask).flatten()
        if real.numel() == 0:
            return Plan((), (), ((q_start, kv_len),))
        first_real, end_real = int(real[0]), int(real[-1]) + 1
        if real.numel() != end_real - first_real:
            return None  # padding in the middle of the row
    if document_ids is None:
        document_ids = torch.zeros_like(segment_ids)
    runs = _runs(segment_ids, document_ids, first_real, end_real)
    spans = _spans(runs)
    if spans is None:
        return None
    documents, segments = spans

    quarter = quarter_rows(kv_len, piece)
    pieces = _Pieces(kv_len, q_len, size, quarter, whole, band)
    for run in runs:
        if run.end <= q_start:
            continue
        start = max(run.start, q_start)
        if run.region == 1:
            doc_start = documents[run.document][0]
            if pieces.stretch and pieces.stretch[1] != doc_start:
                pieces.close(start)
            if run.segment >= 0 and run.end - start >= piece:
                pieces.close(start)
                pieces.full(start, run.end, doc_start, run.end)
                continue
            pieces.open(start, doc_start)
            if run.segment >= 0 and run.end - start > 1:
                pieces.uppers.append((start, run.end))
            continue
        pieces.close(start)
        # padding: on the left no real key precedes it, so it sees at most the real run of its segment;
        # on the right every real key of its document precedes it
        if run.region == 0:
            keys = segments.get((run.document, run.segment)) if run.segment >= 0 else None
        else:
            keys = documents.get(run.document)
        if keys is None:
            pieces.selfs.append((start, run.end))
        else:
            pieces.full(start, run.end, keys[0], keys[1])
    pieces.close(kv_len)
    return pieces.plan(max(piece, quarter // 4))
