"""The segment-blocked plan of a batch: inexpressible layouts have none, its pieces and its batched calls
cover exactly the mask, its work is the pair count, and one plan per forward call (literal plans of one
row: tests/test_row_plan.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import INEXPRESSIBLE, inexpressible, layouts
from hypothesis import given, settings
from hypothesis import strategies as st

from segmask import attention_plan, masks, row_plan
from segmask.attention_plan import Layout, Squares, batch_calls, plan_layout
from segmask.row_plan import LONG_CALL, Band, Block

pytestmark = pytest.mark.exactness


def test_literal_band_mask():
    """In a tile, a query sees the tile's keys up to itself, or to its segment's end when in one (even one
    that began in an earlier tile or ends in a later one): ``reach`` counts them, ``mask`` hides the rest."""
    band = Band(4, 4, 2, ((3, 6), (9, 14)))
    assert band.reach().tolist() == [[2, 2, 3, 4], [1, 4, 4, 4]]
    assert band.mask()[0].int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert band.mask()[1].int().tolist() == [[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    additive = Layout(torch.zeros(1, 12, dtype=torch.long)).band_mask(
        band, torch.float32, torch.device("cpu")
    )
    assert additive.shape == (2, 1, 4, 4)
    hidden = torch.finfo(torch.float32).min  # as the dense route's additive mask (masks.to_additive)
    assert torch.equal(additive[:, 0] == hidden, band.mask())
    assert (additive[:, 0][~band.mask()] == 0).all()


@pytest.mark.parametrize("name", INEXPRESSIBLE)
def test_inexpressible_layouts_have_no_plan(name):
    assert plan_layout(*inexpressible(name), 5) is None


def test_plan_work_is_the_pair_count():
    """10% system, 60% user, 30% answer at 4096 tokens: the pieces hold exactly the allowed pairs."""
    seq_len = 4096
    segment_ids = torch.full((1, seq_len), -1)
    segment_ids[0, :409], segment_ids[0, 409:2867] = 0, 1
    ((_, _, plan),) = plan_layout(segment_ids, None, None, seq_len, piece=256)
    pairs = sum(
        (b.q_end - b.q_start) * (b.q_end - b.q_start + 1) // 2
        if b.causal
        else (b.q_end - b.q_start) * (b.k_end - b.k_start)
        for b in plan.blocks
    )
    assert pairs == 409 * 409 + 2458 * 2867 + 1229 * 2867 + 1229 * 1230 // 2
    assert not plan.uppers and not plan.selfs
    assert max(b.q_end - b.q_start for b in plan.blocks) <= seq_len // 4


def test_one_causal_call_when_the_batch_shares_a_causal_stretch():
    """Short segments only: the batch's plan is one causal call over everything plus the reversed squares,
    also when the rows' short segments differ (their blocks are the same); rows whose blocks differ cut each
    stretch into blocks of at most a quarter of the keys."""
    ids = [0, 0, -1, 1, 1, 1, -1, -1, 2, 2, 2, -1, -1, -1, -1, -1]
    ((first, last, plan),) = plan_layout(torch.tensor([ids, ids]), None, None, 16, piece=4)
    assert (first, last) == (0, 2)
    assert plan.blocks == (Block(0, 16, 0, 16, causal=True),)
    assert [s for upper in plan.uppers for s in upper.segments] == [(3, 6), (8, 11), (0, 2)]
    groups = plan_layout(torch.tensor([ids, ids[::-1]]), None, None, 16, piece=4)
    assert [group[:2] for group in groups] == [(0, 1), (1, 2)]
    assert all(plan.blocks == (Block(0, 16, 0, 16, causal=True),) for _, _, plan in groups)
    calls = batch_calls(groups, budget=2 * 4)
    assert calls.blocks == ((0, 2, Block(0, 16, 0, 16, causal=True)),)
    padded = plan_layout(
        torch.tensor([ids, ids]), torch.tensor([[1] * 16, [0] + [1] * 15]), None, 16, piece=4
    )
    assert [group[:2] for group in padded] == [(0, 1), (1, 2)]
    assert all(b.q_end - b.q_start <= 4 for _, _, plan in padded for b in plan.blocks)


def test_a_layout_plans_once(monkeypatch):
    """Every layer of one forward call shares its layout's plan; a new layout plans anew."""
    calls = []
    real = attention_plan.plan_layout
    monkeypatch.setattr(attention_plan, "plan_layout", lambda *a: calls.append(a) or real(*a))
    layout = Layout(torch.tensor([[0, 0, 1, -1]]))
    first = layout.plan(4, 3)
    assert layout.plan(4, 3) is first and len(calls) == 1
    layout.plan(2, 3)
    Layout(layout.segment_ids).plan(4, 3)
    assert len(calls) == 3


def add_band(count: torch.Tensor, rows, band: Band, offset: int) -> None:
    """Count the pairs a band's tiles cover into ``count [B, Q, K]``."""
    seen = (~band.mask()).long()
    for tile in range(band.count):
        start = band.start + tile * band.size
        count[rows, start - offset : start - offset + band.size, start : start + band.size] += seen[tile]


def coverage(
    segment_ids, attention_mask=None, document_ids=None, q_len=None, piece=3, band=0
) -> torch.Tensor:
    """How many pieces of the plan cover each (query, key) pair: ``[B, Q, K]`` counts."""
    batch, kv_len = segment_ids.shape
    q_len = kv_len if q_len is None else q_len
    offset = kv_len - q_len
    count = torch.zeros(batch, q_len, kv_len, dtype=torch.long)
    for first, last, plan in plan_layout(segment_ids, attention_mask, document_ids, q_len, piece, band):
        rows = slice(first, last)
        for tiles in plan.bands:
            add_band(count, rows, tiles, offset)
        for block in plan.blocks:
            area = torch.ones(block.q_end - block.q_start, block.k_end - block.k_start, dtype=torch.long)
            if block.causal:
                area = area.tril()
            count[rows, block.q_start - offset : block.q_end - offset, block.k_start : block.k_end] += area
        for upper in plan.uppers:
            for start, end in upper.segments:
                for i in range(start, end - 1):
                    count[rows, i - offset, i + 1 : end] += 1
        for start, end in plan.selfs:
            for i in range(start, end):
                count[rows, i - offset, i] += 1
    return count


@settings(max_examples=160, deadline=None)
@given(
    layout=layouts(),
    piece=st.sampled_from([1, 3, 256]),
    band=st.sampled_from([0, 1, 2, 4]),
    long_call=st.sampled_from([LONG_CALL, 5, 6]),
)
def test_plan_covers_each_allowed_pair_exactly_once(layout, piece, band, long_call):
    """The plan's pieces are disjoint and their union is the mask; a padded query with no key covers itself.
    ``long_call`` 5 and 6 make blocks longer than a quarter of these short rows' keys (from 14 and 16), so
    that groups of tiles and band calls part ways, as from 2,048 keys at the real size."""
    segment_ids, attention_mask, document_ids, q_len = layout
    saved, row_plan.LONG_CALL = row_plan.LONG_CALL, long_call
    try:
        count = coverage(segment_ids, attention_mask, document_ids, q_len, piece, band)
    finally:
        row_plan.LONG_CALL = saved
    expected = masks.sdpa_mask(segment_ids, attention_mask, document_ids, q_len)[:, 0]
    assert torch.equal(count, expected.long())


def test_literal_calls_of_a_batch():
    """A block shared by neighbouring row groups runs once over their rows; writes come before merges; the
    reversed squares of both rows are batched together, largest first, within the budget."""
    row = ([0, 0, 0, 1, 1, 1, -1, -1], [0, 0, 0, 1, 1, -1, -1, -1])
    groups = plan_layout(torch.tensor(row), None, None, 8, piece=3)
    assert [group[:2] for group in groups] == [(0, 1), (1, 2)]
    calls = batch_calls(groups, budget=16)
    assert calls.blocks == (
        (0, 2, Block(0, 3, 0, 3)),
        (0, 1, Block(3, 6, 0, 6)),
        (0, 1, Block(6, 8, 0, 6)),
        (1, 2, Block(3, 5, 0, 3)),
        (1, 2, Block(5, 8, 0, 5)),
        (0, 1, Block(6, 8, 6, 8, causal=True, merge=True)),
        (1, 2, Block(3, 5, 3, 5, causal=True, merge=True)),
        (1, 2, Block(5, 8, 5, 8, causal=True, merge=True)),
    )
    assert calls.squares == (Squares(8, ((1, 3, 5),)),)
    assert calls.count() == 9


def calls_coverage(
    segment_ids, attention_mask=None, document_ids=None, q_len=None, piece=3, budget=8, band=0
):
    """Like :func:`coverage`, through :func:`batch_calls`; also checks that every query is written (by a
    non-merging block or as a self) exactly once and before any merge into it."""
    batch, kv_len = segment_ids.shape
    q_len = kv_len if q_len is None else q_len
    offset = kv_len - q_len
    count = torch.zeros(batch, q_len, kv_len, dtype=torch.long)
    written = torch.zeros(batch, q_len, dtype=torch.long)
    groups = plan_layout(segment_ids, attention_mask, document_ids, q_len, piece, band)
    calls = batch_calls(groups, budget)
    for first, last, tiles in calls.bands:  # the fast path runs them first: they write
        written[first:last, tiles.start - offset : tiles.end - offset] += 1
        add_band(count, slice(first, last), tiles, offset)
    for first, last, start, end in calls.selfs:
        for i in range(start, end):
            count[first:last, i - offset, i] += 1
        written[first:last, start - offset : end - offset] += 1
    merging = False
    for first, last, block in calls.blocks:
        rows, queries = slice(first, last), slice(block.q_start - offset, block.q_end - offset)
        assert not (merging and not block.merge), "a block writes after a merge"
        merging = block.merge
        if block.merge:
            assert (written[rows, queries] == 1).all()
        else:
            written[rows, queries] += 1
        area = torch.ones(block.q_end - block.q_start, block.k_end - block.k_start, dtype=torch.long)
        count[rows, queries, block.k_start : block.k_end] += area.tril() if block.causal else area
    for squares in calls.squares:
        assert len(squares.segments) == 1 or len(squares.segments) * squares.size <= budget
        for row, start, end in squares.segments:
            assert end - 1 - start <= squares.size
            assert (written[row, start - offset : end - 1 - offset] == 1).all()
            for i in range(start, end - 1):
                count[row, i - offset, i + 1 : end] += 1
    assert (written == 1).all()
    return count


@settings(max_examples=120, deadline=None)
@given(
    layout=layouts(),
    piece=st.sampled_from([1, 3, 256]),
    budget=st.sampled_from([1, 8, 64]),
    band=st.sampled_from([0, 1, 2, 4]),
)
def test_calls_cover_each_allowed_pair_exactly_once(layout, piece, budget, band):
    segment_ids, attention_mask, document_ids, q_len = layout
    count = calls_coverage(segment_ids, attention_mask, document_ids, q_len, piece, budget, band)
    expected = masks.sdpa_mask(segment_ids, attention_mask, document_ids, q_len)[:, 0]
    assert torch.equal(count, expected.long())


def equal_segments(count: int, length: int, answer: int) -> torch.Tensor:
    """``count`` segments of ``length`` tokens, each followed by ``answer`` causal tokens: ``[1, L]``."""
    return torch.tensor([sum(([s] * length + [-1] * answer for s in range(count)), [])])


def test_many_equal_short_segments_take_few_calls():
    """64 few-shot examples of 16 tokens (+ 4 answer tokens) at 1280 tokens: one causal call and the 64
    reversed squares (15 queries, side 16) in batches of 256 queries, so 1 + 4 calls, not 64."""
    segment_ids = equal_segments(64, 16, 4)
    layout = Layout(segment_ids)
    calls = layout.calls(1280, 256)
    assert calls.blocks == ((0, 1, Block(0, 1280, 0, 1280, causal=True)),)
    assert [(s.size, len(s.segments)) for s in calls.squares] == [(16, 16)] * 4
    assert calls.count() == 5 < 64
    # four rows, shifted by 0, 5, 10, 15 causal tokens: still one causal call, and the 252 squares in
    # batches of at most 4 x 320 / 4 = 320 queries (a quarter of a 320-row block per row), which bounds their
    # memory: 13 calls of 20 squares or fewer (each row planned alone: 7 blocks and 4 batches, 44 calls)
    rows = torch.full((4, 1280), -1)
    for row, shift in enumerate((0, 5, 10, 15)):
        rows[row, shift : shift + 1260] = equal_segments(63, 16, 4)
    calls = Layout(rows).calls(1280, 256)
    assert calls.blocks == ((0, 4, Block(0, 1280, 0, 1280, causal=True)),)
    assert [(s.size, len(s.segments)) for s in calls.squares] == [(16, 20)] * 12 + [(16, 12)]
    assert calls.count() == 14 < 44
