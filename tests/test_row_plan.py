"""One row's segment-blocked plan: literal plans of long and short segments, against a cache, with padding,
with band tiles, and with long calls from 2,048 keys."""

from __future__ import annotations

import pytest
import torch

from segmask.row_plan import (
    LONG_CALL,
    Band,
    Block,
    Plan,
    Upper,
    block_pieces,
    block_rows,
    plan_row,
    quarter_rows,
)

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


def test_a_stretch_of_one_short_segment_is_one_full_block():
    """A short segment alone in its causal stretch (before a long segment, or after one at the end of the
    row) is one full block over its document up to its end: no causal square, no reversed square."""
    assert row([0, 0, 1, 1, 1, 1, -1, -1], piece=4) == Plan(
        (Block(0, 2, 0, 2), Block(2, 6, 0, 6), Block(6, 8, 0, 6), Block(6, 8, 6, 8, causal=True, merge=True))
    )
    assert row([0, 0, 0, 0, 1, 1], piece=4) == Plan((Block(0, 4, 0, 4), Block(4, 6, 0, 6)))
    # sharing its stretch with a causal token, a short segment still goes as a reversed square
    assert row([0, 0, 1, 1, 1, 1, -1, -1, 2, 2], piece=4).uppers == (Upper(8, ((8, 10),)),)
    assert row([0, 0, -1, 1, 1, 1, 1], piece=4).uppers == (Upper(8, ((0, 2),)),)


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


def test_literal_plan_with_bands():
    """With a masked kernel, a causal stretch with short segments is tiles of ``band`` queries: each tile's
    own keys in a band call, the keys before its group as a full block, and a segment crossing a tile's
    end as a full block of its queries over its keys beyond."""
    ids = torch.tensor([0, 0, -1, 1, 1, 1, -1, -1, 2, 2, 2, -1])
    assert plan_row(ids, None, None, 12, 4, False, 4) == Plan(
        (
            Block(3, 4, 4, 6, merge=True),  # segment (3, 6) crosses the first tile's end
            Block(4, 8, 0, 4, merge=True),
            Block(8, 12, 0, 8, merge=True),
        ),
        bands=(
            Band(0, 4, 1, ((0, 2), (3, 6))),
            Band(4, 4, 1, ((3, 6),)),
            Band(8, 4, 1, ((8, 11),)),
        ),
    )
    # a stretch without short segments stays causal blocks (no mask); long segments stay full blocks
    assert plan_row(torch.tensor([0, 0, 0, 0, -1, -1]), None, None, 6, 4, False, 4) == row(
        [0, 0, 0, 0, -1, -1], piece=4
    )


def test_literal_plan_with_long_calls_at_2048_keys():
    """From 2,048 keys on, blocks over the keys before a group of tiles have LONG_CALL (768) rows: groups
    of three tiles, the first taking the remainder; band calls keep at most a quarter of the keys (two
    tiles), which bounds their temporary memory, whatever the groups."""
    assert (block_rows(2047, 256), block_rows(2048, 256), block_rows(4096, 256)) == (512, LONG_CALL, 1024)
    assert (quarter_rows(2048, 256), quarter_rows(4096, 256)) == (512, 1024)
    ids = torch.full((2048,), -1)
    ids[100:110], ids[1270:1290] = 0, 1  # the second crosses the end of the tile [1024, 1280)
    assert plan_row(ids, None, None, 2048, 256, False, 256) == Plan(
        (
            Block(256, 512, 0, 256, merge=True),  # group [0, 512): two tiles
            Block(512, 1280, 0, 512, merge=True),  # group [512, 1280): one long call over the keys before it
            Block(768, 1024, 512, 768, merge=True),
            Block(1024, 1280, 512, 1024, merge=True),
            Block(1270, 1280, 1280, 1290, merge=True),
            Block(1280, 2048, 0, 1280, merge=True),  # group [1280, 2048)
            Block(1536, 1792, 1280, 1536, merge=True),
            Block(1792, 2048, 1280, 1792, merge=True),
        ),
        bands=(
            Band(0, 256, 2, ((100, 110),)),
            Band(512, 256, 2, ()),
            Band(1024, 256, 2, ((1270, 1290),)),
            Band(1536, 256, 2, ()),
        ),
    )


def test_block_pieces_keep_long_calls_long():
    """Balanced pieces, unless they would fall below LONG_CALL rows where a block may have that many: then
    LONG_CALL rows each and one shorter remainder (issue 35: 615-row calls cost about 35 % more per pair
    than 768-row ones on 2 threads)."""
    assert block_pieces(0, 1229, 768) == [(0, 768), (768, 1229)]  # balanced would be 615 + 614
    assert block_pieces(0, 1600, 768) == [(0, 768), (768, 1536), (1536, 1600)]
    assert block_pieces(10, 710, 768) == [(10, 710)]  # one call: nothing to split
    assert block_pieces(0, 2458, 1024) == [(0, 819), (819, 1638), (1638, 2458)]  # balanced stay long
    assert block_pieces(0, 1000, 512) == [(0, 500), (500, 1000)]  # below 2,048 keys: balanced, as before


def test_literal_plan_of_a_long_user_segment_at_2048_keys():
    """The benchmarks' ``prompt`` layout: the user segment's 1,228 rows go as 768 + 460, the causal answer
    (616 rows, one call) as a block over the prompt and its causal square."""
    ids = torch.tensor([0] * 204 + [1] * 1228 + [-1] * 616)
    assert plan_row(ids, None, None, 2048, 256, False, 256) == Plan(
        (
            Block(0, 204, 0, 204),
            Block(204, 972, 0, 1432),
            Block(972, 1432, 0, 1432),
            Block(1432, 2048, 0, 1432),
            Block(1432, 2048, 1432, 2048, causal=True, merge=True),
        )
    )
