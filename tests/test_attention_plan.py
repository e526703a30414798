"""The segment-blocked plan alone: literal plans, its pieces cover exactly the mask, its work is the pair
count, and one plan per forward call."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segmask import attention_plan, masks
from segmask.attention_plan import Block, Layout, Plan, Upper, plan_layout, plan_row

pytestmark = pytest.mark.exactness


def row(ids, mask=None, q_len=None, piece=3) -> Plan | None:
    padding = None if mask is None else torch.tensor(mask)
    return plan_row(torch.tensor(ids), padding, None, q_len or len(ids), piece)


def test_literal_plan_of_long_segments():
    """The module docstring's drawing: a full block per segment, then the keys before the causal run and
    its causal square."""
    assert row([0, 0, 0, 1, 1, 1, -1, -1, -1]) == Plan(
        (Block(0, 3, 0, 3), Block(3, 6, 0, 6), Block(6, 9, 0, 6), Block(6, 9, 6, 9, causal=True, merge=True))
    )


def test_literal_plan_of_short_segments():
    """Segments shorter than a piece stay in the causal stretch; their later tokens are reversed squares."""
    assert row([0, 0, -1, 1, 1, 1, -1, -1], piece=4) == Plan(
        (Block(0, 4, 0, 4, causal=True), Block(4, 8, 0, 4), Block(4, 8, 4, 8, causal=True, merge=True)),
        (Upper(8, ((3, 6),)), Upper(8, ((0, 2),))),
    )


def test_literal_plan_against_a_cache_and_with_padding():
    # the last 2 of 6 positions: only the causal run's blocks
    assert row([0, 0, 1, 1, -1, -1], q_len=2, piece=2) == Plan(
        (Block(4, 6, 0, 4), Block(4, 6, 4, 6, causal=True, merge=True))
    )
    # left padding carrying segment 0 sees only the real run of its segment
    assert row([0, 0, 1, 1, -1, -1], mask=[0, 1, 1, 1, 1, 1], piece=2) == Plan(
        (
            Block(0, 1, 1, 2),
            Block(1, 2, 1, 2, causal=True),
            Block(2, 4, 1, 4),
            Block(4, 6, 1, 4),
            Block(4, 6, 4, 6, causal=True, merge=True),
        )
    )
    # a row of padding only: every query attends to itself
    assert row([0, 0, -1, -1], mask=[0, 0, 0, 0]) == Plan((), (), ((0, 4),))


@pytest.mark.parametrize(
    "segment_ids, attention_mask, document_ids",
    [
        (torch.tensor([[0, 0, -1, 0, -1]]), None, None),  # segment 0 twice in one document
        (torch.tensor([[0, 0, -1, -1, -1]]), torch.tensor([[1, 1, 0, 1, 1]]), None),  # padding in the middle
        (torch.tensor([[0, 0, -1, -1, -1]]), None, torch.tensor([[0, 0, 1, 0, 0]])),  # document split
    ],
    ids=["repeated segment", "inner padding", "split document"],
)
def test_inexpressible_layouts_have_no_plan(segment_ids, attention_mask, document_ids):
    assert plan_layout(segment_ids, attention_mask, document_ids, 5) is None


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
    """Short segments only: the batch's plan is one causal call over everything plus the reversed squares;
    with different rows, each row's stretch is cut into blocks of at most a quarter of the keys."""
    ids = [0, 0, -1, 1, 1, 1, -1, -1, 2, 2, 2, -1, -1, -1, -1, -1]
    ((first, last, plan),) = plan_layout(torch.tensor([ids, ids]), None, None, 16, piece=4)
    assert (first, last) == (0, 2)
    assert plan.blocks == (Block(0, 16, 0, 16, causal=True),)
    assert [s for upper in plan.uppers for s in upper.segments] == [(3, 6), (8, 11), (0, 2)]
    groups = plan_layout(torch.tensor([ids, ids[::-1]]), None, None, 16, piece=4)
    assert [group[:2] for group in groups] == [(0, 1), (1, 2)]
    assert all(b.q_end - b.q_start <= 4 for _, _, plan in groups for b in plan.blocks)


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


def coverage(segment_ids, attention_mask=None, document_ids=None, q_len=None, piece=3) -> torch.Tensor:
    """How many pieces of the plan cover each (query, key) pair: ``[B, Q, K]`` counts."""
    batch, kv_len = segment_ids.shape
    q_len = kv_len if q_len is None else q_len
    offset = kv_len - q_len
    count = torch.zeros(batch, q_len, kv_len, dtype=torch.long)
    for first, last, plan in plan_layout(segment_ids, attention_mask, document_ids, q_len, piece):
        rows = slice(first, last)
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


@st.composite
def layouts(draw):
    """Random rows: runs of segments and causal tokens, optional documents, padding at either end, a cache."""
    batch = draw(st.integers(1, 3))
    kv_len = draw(st.integers(1, 24))
    packed, padded = draw(st.booleans()), draw(st.booleans())
    rows, paddings, documents = [], [], []
    for _ in range(batch):
        segment_ids, document_ids = [], []
        document, next_segment = 0, 0
        while len(segment_ids) < kv_len:
            if segment_ids and packed and draw(st.integers(0, 3)) == 0:
                document += 1
                next_segment = draw(st.sampled_from([0, next_segment]))  # ids may restart per document
            length = draw(st.integers(1, 8))
            if draw(st.booleans()):
                segment_ids += [next_segment] * length
                next_segment += 1
            else:
                segment_ids += [-1] * length
            document_ids += [document] * length
        left = draw(st.integers(0, kv_len))
        right = draw(st.integers(0, kv_len - left))
        rows.append(segment_ids[:kv_len])
        documents.append(document_ids[:kv_len])
        paddings.append([0] * left + [1] * (kv_len - left - right) + [0] * right)
    segment_ids = torch.tensor(rows)
    attention_mask = torch.tensor(paddings) if padded else None
    document_ids = torch.tensor(documents) if packed else None
    q_len = draw(st.integers(1, kv_len))
    return segment_ids, attention_mask, document_ids, q_len


@settings(max_examples=80, deadline=None)
@given(layout=layouts(), piece=st.sampled_from([1, 3, 256]))
def test_plan_covers_each_allowed_pair_exactly_once(layout, piece):
    """The plan's pieces are disjoint and their union is the mask; a padded query with no key covers itself."""
    segment_ids, attention_mask, document_ids, q_len = layout
    count = coverage(segment_ids, attention_mask, document_ids, q_len, piece)
    expected = masks.sdpa_mask(segment_ids, attention_mask, document_ids, q_len)[:, 0]
    assert torch.equal(count, expected.long())
