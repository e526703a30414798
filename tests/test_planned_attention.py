"""Running a plan's calls (:mod:`segmask.planned_attention`): the log-sum-exp merge, and :func:`run_calls`
with and without an autograd graph, against SDPA with the dense mask. (Every layout and kernel through the
public route: tests/test_fast_attention.py.)"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCE, random_qkv, reference

from segmask import kernels
from segmask.attention_plan import Layout
from segmask.planned_attention import _merge, run_calls

pytestmark = pytest.mark.exactness


def test_merging_two_key_ranges_gives_attention_over_both():
    q, k, v, _ = random_qkv(1, 5, 9, q_heads=2, kv_heads=2)
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = kernels.REFERENCE.forward(q, k[:, :, :4], v[:, :, :4], False, scale)
    part_out, part_lse = kernels.REFERENCE.forward(q, k[:, :, 4:], v[:, :, 4:], False, scale)
    _merge(out, lse, part_out, part_lse)
    whole_out, whole_lse = kernels.REFERENCE.forward(q, k, v, False, scale)
    assert (out - whole_out).abs().max() < TOLERANCE
    assert (lse - whole_lse).abs().max() < TOLERANCE


@pytest.mark.parametrize("kernel", [kernels.CPU_FLASH, kernels.REFERENCE], ids=lambda k: k.name)
def test_run_calls_equals_the_dense_mask_with_and_without_a_graph(kernel):
    # long and short segments, several band tiles, a segment crossing a tile's end, causal tokens
    segment_ids = torch.tensor([[0] * 6 + [-1] * 2 + [1, 1, -1, 2, 2, 2, -1, 3, 3, -1]])
    layout = Layout(segment_ids)
    calls = layout.calls(segment_ids.shape[1], piece=4, band=3 if kernel.masked else 0)
    assert calls is not None and calls.count() > 1
    length = segment_ids.shape[1]
    q, k, v, grad = random_qkv(1, length, length, q_heads=4, kv_heads=2)
    if not kernel.grouped:  # the caller repeats the key/value heads (as fast_attention does)
        k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
    scale = 1 / math.sqrt(q.shape[-1])
    band_mask = functools.partial(layout.band_mask, dtype=q.dtype, device=q.device)
    run = functools.partial(run_calls, calls=calls, scale=scale, size=4, kernel=kernel, band_mask=band_mask)
    with torch.no_grad():
        frozen = run(q, k, v)
    assert frozen.grad_fn is None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = run(*leaves)
    out.backward(grad)
    dense_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense = reference(*dense_leaves, segment_ids)
    dense.backward(grad)
    assert (frozen - dense).abs().max() < TOLERANCE
    assert (out - dense).abs().max() < TOLERANCE
    for mine, theirs in zip(leaves, dense_leaves):
        assert (mine.grad - theirs.grad).abs().max() < TOLERANCE
    # and the dense reference is not causal attention here: the test can tell the masks apart
    assert (
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) - dense
    ).abs().max() > 0.1
