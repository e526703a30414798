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

Layers of a transformers model reach this through :func:`segmask_attention_forward`, registered as the
attention implementation ``"segmask"`` by :func:`register`; ``segmask.enable`` hands each call the
token-level :class:`Layout`.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from segmask import masks

logger = logging.getLogger(__name__)

PIECE = 256
"""Segments with at least this many queries are computed as full blocks, shorter ones as reversed causal
squares; blocks have at least this many query rows (the CPU flash kernel's query block)."""

IMPLEMENTATION = "segmask"
"""Name of the transformers attention implementation registered by :func:`register`."""

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


@dataclass(frozen=True, eq=False)
class Layout:
    """Token-level ids of one forward call, over all key positions (cached + current tokens).

    ``segment_ids``: ``[B, K]`` long, ``>= 0`` bidirectional segment, ``-1`` causal token;
    ``attention_mask``: ``[B, K]`` (1 real, 0 padding) or None; ``document_ids``: ``[B, K]`` or None.
    Compared by identity, so a layout can key a cache.
    """

    segment_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    key_lengths: dict[int | None, int] | None = None
    """How many keys each layer kind holds, by sliding window (None: full attention), as the KV cache
    reported them when the mask was built; None: exactly ``K``. The kernel refuses any other count."""

    def __post_init__(self) -> None:
        masks.validate_layout(self.segment_ids, self.attention_mask, self.document_ids)

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
class Plan:
    """One row's attention as disjoint pieces. Each query's keys are the union of its pieces' keys;
    ``selfs`` are query ranges that see no key (padding) and attend to their own position only."""

    blocks: tuple[Block, ...]
    uppers: tuple[Upper, ...] = ()
    selfs: tuple[tuple[int, int], ...] = ()


RowGroup = tuple[int, int, Plan]
"""Rows ``[first, last)`` of a batch that share one plan."""


@dataclass(frozen=True)
class _Run:
    """Consecutive positions ``[start, end)`` with one region (0 left padding, 1 real, 2 right padding),
    one document id and one segment id."""

    start: int
    end: int
    region: int
    document: int
    segment: int


# ---------------------------------------------------------------------------------------------- planning


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


def _block_rows(kv_len: int, piece: int) -> int:
    """Most query rows (and keys in the backward) of one kernel call: a quarter of the keys, at least ``piece``."""
    return max(piece, -(-kv_len // 4))


def _split(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into balanced pieces of at most ``size``."""
    count = -(-(end - start) // size)
    bounds = [start + (end - start) * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _padded_size(n: int) -> int:
    """``n`` rounded up to a multiple of 8 (of 16 from 128 on, ...): the side of its batched square."""
    step = 1 << max(3, n.bit_length() - 4)
    return -(-n // step) * step


def _square_size(segments: list[tuple[int, int]]) -> int:
    """Side of the batched squares of these segments (``end - 1 - start`` queries each)."""
    return _padded_size(max(end - 1 - start for start, end in segments))


def _group_uppers(segments: list[tuple[int, int]], budget: int) -> tuple[Upper, ...]:
    """Batch the reversed squares of short segments, largest first, each batch padded to its largest square
    and holding at most ``budget`` queries (or one square), which bounds the memory of its gathered queries,
    keys and values."""
    uppers: list[Upper] = []
    group: list[tuple[int, int]] = []
    for start, end in sorted(segments, key=lambda s: s[0] - s[1]):
        if group and (len(group) + 1) * _square_size(group) > budget:
            uppers.append(Upper(_square_size(group), tuple(group)))
            group = []
        group.append((start, end))
    if group:
        uppers.append(Upper(_square_size(group), tuple(group)))
    return tuple(uppers)


def plan_row(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    q_len: int,
    piece: int | None = None,
    whole: bool = False,
) -> Plan | None:
    """Pieces of one row (``[K]`` tensors), or None where some query's keys are not one contiguous range.

    Fast-path layouts: real tokens contiguous (padding only at the ends), each document one contiguous run
    of real tokens, and each segment id ``>= 0`` one contiguous run inside its document. A real query ``i``
    then sees ``[doc_start, end(i))``, ``end(i)`` the end of its segment or ``i + 1`` for a causal token:

    - a long segment (``>= piece`` queries): full blocks over ``[doc_start, segment_end)``;
    - any other stretch of the document: causal blocks, each a full block over the keys before it and a
      causal square over its own rows, plus an :class:`Upper` square for each short segment's later tokens.

    Blocks have at most ``max(piece, K / 4)`` query rows and reversed-square calls at most a quarter of that,
    which bounds the temporary memory of a call. Except with ``whole`` (the plan serves the whole batch): a
    causal stretch over every query and key is then one block, whose output is the whole output.
    """
    kv_len = segment_ids.numel()
    q_start = kv_len - q_len
    piece = PIECE if piece is None else piece
    size = _block_rows(kv_len, piece)
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

    # where each document and each (document, segment) lies among the real tokens
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

    blocks: list[Block] = []
    uppers: list[tuple[int, int]] = []
    selfs: list[tuple[int, int]] = []
    stretch: list[int] = []  # [first query, document start] of the open causal stretch

    def full(start: int, end: int, k_start: int, k_end: int) -> None:
        blocks.extend(Block(a, b, k_start, k_end) for a, b in _split(start, end, size))

    def close(end: int) -> None:
        if stretch:
            first, doc_start = stretch
            if whole and first == doc_start == 0 and end == kv_len == q_len:
                blocks.append(Block(0, kv_len, 0, kv_len, causal=True))
                stretch.clear()
                return
            for a, b in _split(first, end, size):
                if a > doc_start:
                    blocks.append(Block(a, b, doc_start, a))
                blocks.append(Block(a, b, a, b, causal=True, merge=a > doc_start))
            stretch.clear()

    for run in runs:
        if run.end <= q_start:
            continue
        start = max(run.start, q_start)
        if run.region == 1:
            doc_start = documents[run.document][0]
            if stretch and stretch[1] != doc_start:
                close(start)
            if run.segment >= 0 and run.end - start >= piece:
                close(start)
                full(start, run.end, doc_start, run.end)
                continue
            if not stretch:
                stretch.extend((start, doc_start))
            if run.segment >= 0 and run.end - start > 1:
                uppers.append((start, run.end))
            continue
        close(start)
        # padding: on the left no real key precedes it, so it sees at most the real run of its segment;
        # on the right every real key of its document precedes it
        if run.region == 0:
            keys = segments.get((run.document, run.segment)) if run.segment >= 0 else None
        else:
            keys = documents.get(run.document)
        if keys is None:
            selfs.append((start, run.end))
        else:
            full(start, run.end, keys[0], keys[1])
    close(kv_len)
    return Plan(tuple(blocks), _group_uppers(uppers, max(piece, size // 4)), tuple(selfs))


def plan_layout(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    q_len: int,
    piece: int | None = None,
) -> tuple[RowGroup, ...] | None:
    """Plans for a batch (``[B, K]`` ids), consecutive rows with one layout grouped; None if any row has none."""
    segment_ids = segment_ids.cpu()
    attention_mask = None if attention_mask is None else attention_mask.cpu()
    document_ids = None if document_ids is None else document_ids.cpu()
    groups: list[RowGroup] = []
    for b in range(segment_ids.shape[0]):
        plan = plan_row(
            segment_ids[b],
            None if attention_mask is None else attention_mask[b],
            None if document_ids is None else document_ids[b],
            q_len,
            piece,
        )
        if plan is None:
            return None
        if groups and groups[-1][2] == plan:
            groups[-1] = (groups[-1][0], b + 1, plan)
        else:
            groups.append((b, b + 1, plan))
    if len(groups) == 1:  # one plan for the whole batch
        whole = plan_row(
            segment_ids[0],
            None if attention_mask is None else attention_mask[0],
            None if document_ids is None else document_ids[0],
            q_len,
            piece,
            whole=True,
        )
        groups = [(0, segment_ids.shape[0], whole)]
    return tuple(groups)


_last_plan: dict[str, tuple] = {}


def _cached_plan(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    q_len: int,
) -> tuple[RowGroup, ...] | None:
    """:func:`plan_layout`, remembered for the last ids seen: every layer of a forward call shares them."""
    tensors = (segment_ids, attention_mask, document_ids)
    # inference tensors have no version counter (and cannot change outside inference mode)
    key = (
        tuple(None if t is None else (-1 if t.is_inference() else t._version) for t in tensors),
        q_len,
        PIECE,
    )
    hit = _last_plan.get("entry")
    if hit is not None and hit[1] == key and all(a is b for a, b in zip(hit[0], tensors)):
        return hit[2]
    plan = plan_layout(segment_ids, attention_mask, document_ids, q_len)
    _last_plan["entry"] = (tensors, key, plan)
    return plan


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


def _block_forward(
    block: Block, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_offset: int, scale: float
) -> None:
    """Run one block of a row group (``[b, H, n, D]`` views) and write or merge it into ``out`` and ``lse``."""
    queries, keys = slice(block.q_start - q_offset, block.q_end - q_offset), slice(block.k_start, block.k_end)
    part_out, part_lse = _FLASH_CPU(
        q[:, :, queries], k[:, :, keys], v[:, :, keys], 0.0, block.causal, scale=scale
    )
    if block.merge:
        _merge(out[:, :, queries], lse[:, :, queries], part_out, part_lse)
    else:
        out[:, :, queries] = part_out
        lse[:, :, queries] = part_lse


def _upper_forward(
    upper: Upper, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_offset: int, scale: float
) -> None:
    """Run one group of reversed squares and merge it into ``out`` and ``lse`` at its queries."""
    squares = _reversed(upper)
    positions = squares.queries - q_offset
    part_out, part_lse = _FLASH_CPU(
        squares.gather(q, positions),
        squares.gather(k, squares.keys),
        squares.gather(v, squares.keys),
        0.0,
        True,
        scale=scale,
    )
    index = positions.index_select(0, squares.real)
    running_out, running_lse = out.index_select(2, index), lse.index_select(2, index)
    _merge(running_out, running_lse, squares.scatter(part_out), squares.scatter(part_lse))
    out.index_copy_(2, index, running_out)
    lse.index_copy_(2, index, running_lse)


def _block_backward(
    block: Block,
    grads: tuple[Tensor, Tensor, Tensor],
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    q_offset: int,
    scale: float,
    size: int,
) -> None:
    """Add one block's share of the gradients to ``grads`` (``dq, dk, dv`` views of the row group).

    The flash backward of a call given the merged output and log-sum-exp is exactly that call's share; a long
    key range goes in pieces, which bounds the temporary key gradients."""
    grad_q, grad_k, grad_v = grads
    queries = slice(block.q_start - q_offset, block.q_end - q_offset)
    pieces = [(block.k_start, block.k_end)] if block.causal else _split(block.k_start, block.k_end, 2 * size)
    for k_start, k_end in pieces:
        keys = slice(k_start, k_end)
        dq, dk, dv = _FLASH_CPU_BACKWARD(
            grad_out[:, :, queries],
            q[:, :, queries],
            k[:, :, keys],
            v[:, :, keys],
            out[:, :, queries],
            lse[:, :, queries],
            0.0,
            block.causal,
            scale=scale,
        )
        grad_q[:, :, queries] += dq
        grad_k[:, :, keys] += dk
        grad_v[:, :, keys] += dv
        del dq, dk, dv  # before the next piece allocates its own


def _upper_backward(
    upper: Upper,
    grads: tuple[Tensor, Tensor, Tensor],
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    q_offset: int,
    scale: float,
) -> None:
    """Add one group of reversed squares' share of the gradients to ``grads``."""
    grad_q, grad_k, grad_v = grads
    squares = _reversed(upper)
    positions = squares.queries - q_offset
    # padding entries: no gradient, and a log-sum-exp that makes their probabilities 0
    dq, dk, dv = _FLASH_CPU_BACKWARD(
        squares.fill_padding(squares.gather(grad_out, positions), 0.0),
        squares.gather(q, positions),
        squares.gather(k, squares.keys),
        squares.gather(v, squares.keys),
        squares.gather(out, positions),
        squares.fill_padding(squares.gather(lse, positions), torch.finfo(torch.float32).max),
        0.0,
        True,
        scale=scale,
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
            group = (query[first:last], key[first:last], value[first:last], out[first:last], lse[first:last])
            for block in plan.blocks[covering is not None :]:
                _block_forward(block, *group, q_offset, scale)
            for upper in plan.uppers:
                _upper_forward(upper, *group, q_offset, scale)
            for start, end in plan.selfs:  # attends to itself only
                out[first:last, :, start - q_offset : end - q_offset] = value[first:last, :, start:end]
                lse[first:last, :, start - q_offset : end - q_offset] = 0.0
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
            rows = slice(first, last)
            group = (grad_out[rows], query[rows], key[rows], value[rows], out[rows], lse[rows])
            group_grads = tuple(g[rows] for g in grads)
            for block in plan.blocks[covering is not None :]:
                _block_backward(block, group_grads, *group, q_offset, ctx.scale, ctx.size)
            for upper in plan.uppers:
                _upper_backward(upper, group_grads, *group, q_offset, ctx.scale)
            for start, end in plan.selfs:
                grads[2][rows, :, start:end] += grad_out[rows, :, start - q_offset : end - q_offset]
        return *(g.to(t.dtype) for g, t in zip(grads, (query, key, value))), None, None, None


# -------------------------------------------------------------------------------------------- public API


@functools.cache
def _log_fallback(reason: str) -> None:
    logger.warning("segmask fast attention: %s; using SDPA with a dense MAS mask", reason)


def _check_shapes(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_ids: torch.Tensor
) -> None:
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


def _fast_path_blocker(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float
) -> str | None:
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
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The reference route: SDPA with the dense ``[B, 1, Q, K]`` MAS mask (optionally within a sliding window).

    Same shapes as :func:`mas_attention`; for a sliding window the key positions are the last ``key.shape[2]``
    of the ``K`` positions the ids cover.
    """
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
    masks.validate_layout(segment_ids, attention_mask, document_ids)
    _check_shapes(query, key, value, segment_ids)
    reason = _fast_path_blocker(query, key, value, dropout)
    groups = None
    if reason is None:
        groups = _cached_plan(segment_ids, attention_mask, document_ids, query.shape[2])
        if groups is None:
            reason = "a segment id repeats within a document, or padding or a document is not contiguous"
    if reason is not None:
        _log_fallback(reason)
        return dense_attention(query, key, value, segment_ids, attention_mask, document_ids, scaling, dropout)
    repeats = query.shape[1] // key.shape[1]
    if repeats > 1:
        key, value = (
            t.unsqueeze(2).expand(-1, -1, repeats, -1, -1).flatten(1, 2) for t in (key, value)
        )  # grouped-query attention: each key/value head serves `repeats` query heads
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    size = _block_rows(key.shape[2], PIECE)
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

    segment_ids, padding, documents = layout.segment_ids, layout.attention_mask, layout.document_ids
    kv_len = segment_ids.shape[1]
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    layout.check_keys(key.shape[2], window)
    if key.shape[2] > kv_len:  # a static cache's unused slots (the cache said so), later than every real one
        key, value = key[:, :, :kv_len], value[:, :, :kv_len]
    if window is not None:
        output = dense_attention(query, key, value, segment_ids, padding, documents, scaling, dropout, window)
    else:
        output = mas_attention(query, key, value, segment_ids, padding, documents, scaling, dropout)
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"segmask"`` with transformers: the attention function and, for calls without a layout
    (plain causal forward, decoding without segment ids), transformers' own ``sdpa_mask``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, segmask_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
