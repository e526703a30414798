"""The mask rule: literal masks per policy, property tests, and every representation against the dense one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segmask import masks, policies

pytestmark = pytest.mark.exactness

# system(2) user(2) answer(2) for each policy
LAYOUTS = {
    "causal": [-1, -1, -1, -1, -1, -1],
    "mas": [0, 0, 1, 1, -1, -1],
    "prefix": [0, 0, 0, 0, -1, -1],
}
EXPECTED = {
    "causal": [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ],
    "mas": [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ],
    "prefix": [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ],
}


def dense(segments, attention_mask=None, document_ids=None, q_len=None) -> list[list[int]]:
    def t(x):
        return None if x is None else torch.tensor([x])

    return masks.dense_mask(t(segments), t(attention_mask), t(document_ids), q_len)[0, 0].int().tolist()


def test_literal_masks_per_policy():
    for policy, segments in LAYOUTS.items():
        assert dense(segments) == EXPECTED[policy], policy


def test_literal_mas_with_left_padding():
    # two pad tokens, then system(1) user(2) answer(1)
    got = dense([-1, -1, 0, 1, 1, -1], attention_mask=[0, 0, 1, 1, 1, 1])
    assert got == [
        [0, 0, 0, 0, 0, 0],  # padded query rows: nothing real before them
        [0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1],
    ]


def test_literal_mas_with_two_packed_documents():
    # doc 0: seg 0 (2 tokens) + answer (1); doc 1: seg 0 (2 tokens) + answer (1); segment ids restart per document
    got = dense([0, 0, -1, 0, 0, -1], document_ids=[0, 0, 0, 1, 1, 1])
    assert got == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]


def test_queries_can_be_the_last_rows():
    segments = LAYOUTS["mas"]
    assert dense(segments, q_len=2) == EXPECTED["mas"][-2:]


def test_never_empty_makes_sdpa_finite_for_padded_rows():
    segment_ids = torch.tensor([[-1, -1, 0, 0, -1]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1]])
    q = torch.randn(1, 2, 5, 8)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, q, q, attn_mask=masks.sdpa_mask(segment_ids, attention_mask)
    )
    assert torch.isfinite(out).all()
    bias = masks.attention_bias(segment_ids, attention_mask)
    weights = torch.softmax(q @ q.transpose(-1, -2) + bias, dim=-1)
    assert torch.isfinite(weights).all()
    # real rows are untouched by the safety diagonal
    assert torch.equal(
        masks.sdpa_mask(segment_ids, attention_mask)[..., 2:, :],
        masks.dense_mask(segment_ids, attention_mask)[..., 2:, :],
    )


def test_block_mask_covers_exactly_the_dense_blocks():
    segment_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1]])
    block = masks.block_mask(segment_ids, block_size=4)
    blocks = block.to_dense()[0, 0].int().tolist()
    # system block sees itself; user block sees system + itself; answer sees everything up to the diagonal
    assert blocks == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_window_limits_both_directions():
    segment_ids = torch.tensor([[0, 0, 0, 0, -1, -1]])
    fn = masks.and_masks(masks.mask_function(segment_ids), masks.window_function(2))
    got = masks.evaluate(fn, 1, 6, 6, torch.device("cpu"))[0, 0].int().tolist()
    assert got == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]


def test_dense_with_window_key_offset_and_unused_slots():
    segment_ids = torch.tensor([[0, 0, 0, 0, -1, -1]])
    # the last 2 queries, a window of 2, keys 3.. as a sliding-window cache holds them, then 2 unused slots
    got = masks.dense(segment_ids, q_len=2, sliding_window=2, kv_offset=3, kv_len=5)
    assert got.shape == (1, 1, 2, 5)
    assert got[0, 0].int().tolist() == [[1, 1, 0, 0, 0], [0, 1, 1, 0, 0]]
    assert torch.equal(masks.dense(segment_ids), masks.dense_mask(segment_ids))
    with pytest.raises(ValueError, match="q_len must be in"):
        masks.dense(segment_ids, q_len=7)


def test_bad_layouts_raise_clear_errors():
    import pytest

    with pytest.raises(ValueError, match="shape \\[batch, seq_len\\]"):
        masks.dense_mask(torch.tensor([0, 0, -1]))
    with pytest.raises(ValueError, match=">= 0"):
        masks.dense_mask(torch.tensor([[0, -2]]))
    with pytest.raises(ValueError, match="integer"):
        masks.dense_mask(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        masks.dense_mask(torch.tensor([[0, 0]]), torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match="unknown mask policy"):
        policies.check_policy("bidirectional")


# ---------------------------------------------------------------- property tests over random layouts


@st.composite
def layouts(draw):
    """Random rows: padding on either side, 1-3 packed documents, each a few segments then causal tokens."""
    batch = draw(st.integers(1, 3))
    rows_seg, rows_doc, rows_pad = [], [], []
    length = draw(st.integers(2, 24))
    for _ in range(batch):
        seg, doc = [], []
        for d in range(draw(st.integers(1, 3))):
            for s in range(draw(st.integers(0, 3))):
                seg += [s] * draw(st.integers(1, 4))
            seg += [-1] * draw(st.integers(0, 4))
            doc += [d] * (len(seg) - len(doc))
        seg, doc = seg[:length], doc[:length]
        n_pad = length - len(seg)
        left = draw(st.booleans())
        pad = [0] * n_pad
        if left:
            seg, doc, mask = [-1] * n_pad + seg, [0] * n_pad + doc, pad + [1] * (length - n_pad)
        else:
            seg, doc, mask = (
                seg + [-1] * n_pad,
                doc + [doc[-1] if doc else 0] * n_pad,
                [1] * (length - n_pad) + pad,
            )
        rows_seg.append(seg)
        rows_doc.append(doc)
        rows_pad.append(mask)
    return torch.tensor(rows_seg), torch.tensor(rows_doc), torch.tensor(rows_pad)


def causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_properties(layout):
    segment_ids, document_ids, attention_mask = layout
    batch, length = segment_ids.shape
    mas = masks.dense_mask(segment_ids)[:, 0]
    full = masks.dense_mask(segment_ids, attention_mask, document_ids)[:, 0]

    # MAS contains causal
    assert (mas | causal(length)).equal(mas)
    # all -1 equals causal
    assert masks.dense_mask(torch.full_like(segment_ids, -1))[:, 0].equal(
        causal(length).expand(batch, -1, -1)
    )
    # nothing crosses documents
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    assert not (full & ~same_doc).any()
    # nothing attends to padding
    assert not (full & ~attention_mask.bool()[:, None, :]).any()
    # no causal token attends to a later position
    later = ~causal(length)
    causal_rows = (segment_ids == -1)[:, :, None]
    assert not (full & later & causal_rows).any()
    # a bidirectional token sees later tokens only inside its own segment
    same_seg = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] >= 0)
    assert not (full & later & ~same_seg).any()


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12))
def test_segments_of_length_one_equal_causal(length):
    segment_ids = torch.arange(length)[None]
    assert masks.dense_mask(segment_ids)[0, 0].equal(causal(length))


def test_draw():
    assert masks.draw(masks.dense_mask(torch.tensor([[0, 0, -1]]))[0, 0]) == "■ ■ ⬚\n■ ■ ⬚\n■ ■ ■"


# ------------------------------------------------------------- against transformers' blockwise overlay


@pytest.fixture(scope="module")
def upstream_mask():
    """transformers' own MAS mask: ``create_causal_mask(block_sequence_ids=segment_ids)`` (the causal mask OR
    ``blockwise_overlay``, then padding and packed sequences), as a function of ``(backend, segment_ids,
    attention_mask, position_ids)``; skipped on a transformers release without ``block_sequence_ids``."""
    import inspect

    import transformers
    from transformers import masking_utils

    if "block_sequence_ids" not in inspect.signature(masking_utils.create_causal_mask).parameters:
        pytest.skip(
            f"transformers {transformers.__version__} has no create_causal_mask(block_sequence_ids=...)"
        )

    def build(backend, segment_ids, attention_mask=None, position_ids=None):
        config = transformers.LlamaConfig(hidden_size=8, num_attention_heads=1, num_hidden_layers=1)
        config._attn_implementation = backend
        return masking_utils.create_causal_mask(
            config,
            torch.zeros(*segment_ids.shape, 8),
            attention_mask,
            None,  # no cache (the argument's name changed within the supported range)
            position_ids=position_ids,
            block_sequence_ids=segment_ids,
            allow_is_causal_skip=False,
        )

    return build


def positions_of(document_ids: torch.Tensor) -> torch.Tensor:
    """Per-document positions (0 at each document's first token), from which transformers finds packed rows."""
    index = torch.arange(document_ids.shape[1]).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_masks_equal_transformers_block_sequence_masks(upstream_mask, layout):
    """segmask's segment clause is upstream's ``blockwise_overlay``: on random layouts with padding the dense
    mask (SDPA) and the additive mask (eager, on every row with a key to see) equal transformers' own."""
    segment_ids, _, attention_mask = layout
    padded = upstream_mask("sdpa", segment_ids, attention_mask)
    assert torch.equal(padded, masks.dense_mask(segment_ids, attention_mask))
    additive = upstream_mask("eager", segment_ids, attention_mask)
    seen = masks.dense_mask(segment_ids, attention_mask).any(-1)
    assert torch.equal(additive[seen], masks.attention_bias(segment_ids, attention_mask)[seen])


@pytest.fixture(scope="module")
def upstream_packed_mask(upstream_mask):
    """``upstream_mask`` for packed rows, skipped where transformers ORs the block overlay after the
    packed-sequence mask (5.18 does): there one segment id in two documents attends across them."""
    import transformers

    shared = upstream_mask("sdpa", torch.tensor([[0, 0]]), position_ids=torch.tensor([[0, 0]]))
    if bool(shared[0, 0, 0, 1]):
        pytest.skip(
            f"transformers {transformers.__version__} ORs blockwise_overlay after the packed-sequence mask: a "
            f"segment id in two packed documents attends across them (segmask keeps documents apart)"
        )
    return upstream_mask


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_packed_masks_equal_transformers_block_sequence_masks(upstream_packed_mask, layout):
    """With packed documents (which transformers reads from per-document positions, without padding), segment
    ids restarting in each document: the dense mask equals transformers' own."""
    segment_ids, document_ids, _ = layout
    packed = upstream_packed_mask("sdpa", segment_ids, position_ids=positions_of(document_ids))
    assert torch.equal(packed, masks.dense_mask(segment_ids, None, document_ids))


# ------------------------------------------------------------------------------------------ the cut rule


def test_cuts_are_segment_boundaries_causal_positions_and_the_end():
    assert masks.cuts([-1, 0, 0, 1, 1, -1, -1]) == [1, 3, 5, 6, 7]  # a causal sink is a cut of its own
    assert masks.cuts([0, 0, 0, 1, 1, -1, -1, -1]) == [3, 5, 6, 7, 8]
    assert masks.cuts([0, 0, 0, 0]) == [4]
    assert masks.cuts([-1, -1, -1]) == [1, 2, 3]
    assert masks.cuts([]) == []
    # a segment id that recurs spans everything between: its tokens see each other, so no cut inside
    assert masks.cuts([0, 0, 1, 1, 0, 0, -1, -1]) == [6, 7, 8]
    assert masks.cuts([0, -1, 0, 1, -1]) == [3, 4, 5]


@pytest.mark.parametrize("layout", [[0, 0, 1, 1, -1, -1], [-1, 0, 1, 0, -1, 2, 2], [0, -1, 0, 1, -1]])
def test_no_token_before_a_cut_sees_one_after_it(layout):
    """The cut rule agrees with the mask rule: at a cut the dense mask has no allowed pair across it, and
    every other position has one (so no cut is missed)."""
    allowed = masks.dense_mask(torch.tensor([layout]))[0, 0]
    crossing = [bool(allowed[:c, c:].any()) for c in range(1, len(layout) + 1)]
    assert [c for c, crosses in zip(range(1, len(layout) + 1), crossing) if not crosses] == masks.cuts(layout)


def test_the_longest_whole_prefix_within_a_limit():
    """The server's prefix cache keeps the leading whole segments that fit: the last cut within the limit."""

    def whole(segments, limit):
        return max((c for c in masks.cuts(segments) if c <= limit), default=0)

    assert [whole([0, 0, 1, 1, -1, -1], n) for n in range(7)] == [0, 0, 2, 2, 4, 5, 6]
    assert [whole([0, 1, 0, -1], n) for n in range(5)] == [0, 0, 0, 3, 4]  # segment 0 is not contiguous
    assert whole([-1, -1, -1], 2) == 2


def test_reusable_prefix_stops_at_changes_and_segments_that_span_the_cut():
    # same tokens and segments, new tokens follow in a new segment: everything is reusable
    assert masks.reusable_prefix([5, 6, 7], [0, 0, -1], [5, 6, 7, 8, 9], [0, 0, -1, 1, -1]) == 3
    # a token differs
    assert masks.reusable_prefix([5, 6, 7], [0, 0, -1], [5, 6, 9, 8], [0, 0, -1, 1]) == 2
    # the segment of the cached tokens continues in the new sequence: cut back to its start
    assert masks.reusable_prefix([5, 6, 7, 8], [-1, 0, 0, -1], [5, 6, 7, 9], [-1, 0, 0, 0]) == 1
    # ... or continued in the cached sequence beyond the match
    assert masks.reusable_prefix([5, 6, 7, 8], [-1, 0, 0, 0], [5, 6, 7, 9], [-1, 0, 0, -1]) == 1
    # segment ids differ (policy changed)
    assert masks.reusable_prefix([5, 6, 7], [0, 0, -1], [5, 6, 7], [-1, -1, -1]) == 0
    # a segment id that comes back later (prefix policy): the whole segment is recomputed
    assert masks.reusable_prefix([5, 6, 7], [0, 0, -1], [5, 6, 7, 8], [0, 0, 0, -1]) == 0
