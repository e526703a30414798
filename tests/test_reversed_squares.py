"""segmask.reversed_squares: reads and writes of scattered entries equal advanced indexing in every memory
layout attention meets, without copying a tensor whole; the index of a batch of reversed squares."""

from __future__ import annotations

import pytest
import torch

from segmask import reversed_squares

pytestmark = pytest.mark.exactness


def _layouts_of(batch: int) -> dict[str, torch.Tensor]:
    """The same ``[batch, 3, 10, 4]`` values in the memory layouts attention meets: contiguous
    ``[B, H, K, D]``, the transposed view of ``[B, K, H, D]`` (a model's projections), a slice of a fused
    projection (contiguous in neither order), and one whose last dimension is not contiguous."""
    base = torch.randn(batch, 3, 10, 4)
    fused = torch.randn(batch, 10, 3, 8)
    fused[..., :4] = base.transpose(1, 2)
    return {
        "BHKD": base.clone(),
        "BKHD view": base.transpose(1, 2).contiguous().transpose(1, 2),
        "fused slice": fused[..., :4].transpose(1, 2),
        "D strided": base.transpose(-1, -2).contiguous().transpose(-1, -2),
    }


@pytest.mark.parametrize("batch", [1, 2])
def test_take_reads_every_layout_without_copying_it_whole(batch):
    """``take`` equals advanced indexing in every layout, and never clones the input first (which
    ``index_select`` on a non-contiguous tensor does: a copy of all of q per batch of squares) nor
    indexes over batch rows (5x slower on CPU) where the layout has a row view."""
    rows = torch.tensor([0, batch - 1, 0])
    positions = torch.tensor([7, 2, 3])
    for name, x in _layouts_of(batch).items():
        expected = x[rows, :, positions].transpose(0, 1)
        with torch.profiler.profile() as profiler:
            taken = reversed_squares.take(x, rows, positions)
        assert torch.equal(taken, expected), name
        assert (reversed_squares.row_view(x) is None) == (name == "D strided"), name
        slow = [
            e.name for e in profiler.events() if e.name in ("aten::clone", "aten::contiguous", "aten::index")
        ]
        if name != "D strided":
            assert slow == [], f"{name}: {slow}"


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("add", [False, True])
def test_put_writes_exactly_its_entries_in_every_layout(batch, add):
    """``put`` writes (or adds) values at its entries and touches nothing else, in every layout."""
    rows = torch.tensor([0, batch - 1, 0])
    positions = torch.tensor([7, 2, 3])
    values = torch.randn(3, 3, 4)
    for name, x in _layouts_of(batch).items():
        expected = x.clone()
        if add:
            expected[rows, :, positions] += values.transpose(0, 1)
        else:
            expected[rows, :, positions] = values.transpose(0, 1)
        reversed_squares.put(x, rows, positions, values, add)
        assert torch.equal(x, expected), name
        lse = x[..., 0]  # [B, H, K] with a stride of 4 between positions
        expected_lse = lse.clone()
        expected_lse[rows, :, positions] = values[..., 0].transpose(0, 1)
        reversed_squares.put(lse, rows, positions, values[..., 0], add=False)
        assert torch.equal(lse, expected_lse), name


def test_literal_index_of_reversed_squares():
    """Two squares of side 4 (rows 0 and 1): each segment's later tokens, reversed, padded at the end."""
    index = reversed_squares.indices(4, ((0, 2, 5), (1, 0, 3)), torch.device("cpu"))
    assert (index.count, index.size) == (2, 4)
    assert index.rows.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert index.queries.tolist() == [3, 2, 2, 2, 1, 0, 0, 0]  # segment (2, 5): queries 3, 2; then padding
    assert index.keys.tolist() == [4, 3, 3, 3, 2, 1, 1, 1]
    assert index.padding.tolist() == [False, False, True, True, False, False, True, True]
    x = torch.arange(2 * 1 * 6, dtype=torch.float32).view(2, 1, 6)  # [B, H, K]: value = 6 * row + position
    assert index.gather(x, "queries", 0, fill=-1.0)[:, 0].tolist() == [[3, 2, -1, -1], [7, 6, -1, -1]]
    assert index.take(x, "real keys")[0].tolist() == [4, 3, 8, 7]
