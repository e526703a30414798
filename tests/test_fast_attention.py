"""The fast MAS kernel equals SDPA with the dense mask (outputs and gradients) through every kernel and memory
layout, falls back exactly where the plan cannot express a layout, and takes the calls its plan counts.
(As transformers' "segmask" implementation it is tested in tests/test_hook.py.)"""

from __future__ import annotations

import logging
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import CASES, INEXPRESSIBLE, TOLERANCE, inexpressible, layouts, random_qkv, reference
from hypothesis import given, settings
from hypothesis import strategies as st

from segmask import fast_attention, kernels, reversed_squares, row_plan
from segmask.attention_plan import Layout, plan_layout
from segmask.fast_attention import mas_attention

pytestmark = pytest.mark.exactness


@pytest.fixture(autouse=True)
def _small_pieces(monkeypatch):
    """Tiny sequences exercise long-segment blocks, band tiles (several per stretch, segments crossing
    them) and reversed squares only with a small piece and a small band."""
    monkeypatch.setattr(fast_attention, "PIECE", 3)
    monkeypatch.setattr(fast_attention, "BAND", 2)


# the CPU flash kernel without its mask: the plan then takes reversed squares instead of band tiles (as for
# a kernel that takes no mask, like cuda-flash), so that path is checked on CPU too
SQUARES = kernels.Kernel(
    "cpu-flash, unmasked", kernels.CPU_FLASH.forward, kernels.CPU_FLASH.backward, "cpu", grouped=True
)


def outputs_and_grads(fn, q, k, v, grad):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def assert_matches_dense(
    segment_ids, attention_mask=None, document_ids=None, q_len=None, kernel=None, blhd=False, **shape
):
    """``blhd``: q, k, v stored as ``[B, L, H, D]`` (transposed views, as transformers' layers pass them)."""
    batch, kv_len = segment_ids.shape
    q_len = kv_len if q_len is None else q_len
    assert plan_layout(segment_ids, attention_mask, document_ids, q_len) is not None, "fast path not taken"
    q, k, v, grad = random_qkv(batch, q_len, kv_len, **shape)
    if blhd:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    fast = outputs_and_grads(
        lambda *t: mas_attention(*t, segment_ids, attention_mask, document_ids, kernel=kernel), q, k, v, grad
    )
    dense = outputs_and_grads(
        lambda *t: reference(*t, segment_ids, attention_mask, document_ids), q, k, v, grad
    )
    for name, a, b in zip(("output", "grad q", "grad k", "grad v"), fast, dense):
        assert not a.isnan().any(), name
        assert (a - b).abs().max() < TOLERANCE, name


@pytest.mark.parametrize(
    "kernel", ["cpu-flash", "reference", SQUARES], ids=["cpu-flash", "reference", "squares"]
)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", CASES)
def test_matches_dense_reference(case, heads, kernel):
    """Through either kernel: the reference kernel checks the plan-and-merge machinery on its own."""
    segment_ids, attention_mask, document_ids, q_len = CASES[case]
    assert_matches_dense(
        segment_ids, attention_mask, document_ids, q_len, kernel, q_heads=heads[0], kv_heads=heads[1]
    )


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("case", ["system-user-answer", "left padding", "packed and padded against a cache"])
def test_forward_only_path_matches_dense(case, mode):
    """Without autograd (generation, evaluation, serving) the kernel takes its graph-free path: same outputs."""
    segment_ids, attention_mask, document_ids, q_len = CASES[case]
    q, k, v, _ = random_qkv(segment_ids.shape[0], q_len or segment_ids.shape[1], segment_ids.shape[1])
    dense = reference(q, k, v, segment_ids, attention_mask, document_ids)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        fast = mas_attention(q, k, v, segment_ids, attention_mask, document_ids)
    assert not fast.requires_grad and (fast - dense).abs().max() < TOLERANCE


@pytest.mark.parametrize("piece", [3, 256])
def test_long_and_short_segments(monkeypatch, piece):
    """A 40-token row with segments of 1-12 tokens: blocks for the long ones, reversed squares for the rest."""
    monkeypatch.setattr(fast_attention, "PIECE", piece)
    segment_ids = torch.tensor([[0] * 12 + [-1] * 3 + [1] * 2 + [-1] * 5 + [2] * 9 + [-1] + [3] + [-1] * 7])
    assert_matches_dense(segment_ids)
    assert_matches_dense(segment_ids, q_len=23)


def test_all_causal_is_causal_sdpa():
    q, k, v, _ = random_qkv(2, 12, 12, 4, 4)
    fast = mas_attention(q, k, v, torch.full((2, 12), -1))
    assert (fast - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max() < TOLERANCE


def test_padded_query_attends_to_itself():
    segment_ids, attention_mask = torch.tensor([[-1, -1, 0, -1]]), torch.tensor([[0, 0, 1, 1]])
    q, k, v, _ = random_qkv(1, 4, 4, 2, 2)
    out = mas_attention(q, k, v, segment_ids, attention_mask)
    assert torch.equal(out[:, :, :2], v[:, :, :2])


def test_causal_token_never_sees_a_later_token():
    """Perturbing the keys and values after a causal token leaves its output unchanged."""
    segment_ids = torch.tensor([[0, 0, 0, -1, -1, 1, 1, -1, -1]])
    q, k, v, _ = random_qkv(1, 9, 9, 2, 2)
    out = mas_attention(q, k, v, segment_ids)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:] += 3.0
    v2[:, :, 5:] -= 3.0
    changed = mas_attention(q, k2, v2, segment_ids)
    assert torch.equal(out[:, :, :5], changed[:, :, :5])
    assert not torch.allclose(out[:, :, 5:], changed[:, :, 5:])


@settings(max_examples=150, deadline=None)
@given(
    layout=layouts(),
    piece=st.sampled_from([1, 3, 256]),
    band=st.sampled_from([1, 2, 4, 256]),
    kernel=st.sampled_from(["cpu-flash", "reference", SQUARES]),
    long_call=st.sampled_from([row_plan.LONG_CALL, 6]),
)
def test_random_layouts_match_dense(layout, piece, band, kernel, long_call):
    """``long_call`` 6: blocks longer than a quarter of the keys from 16 keys on (as from 2,048 at the real
    size), so that tile groups and band calls part ways."""
    saved = row_plan.LONG_CALL
    fast_attention.PIECE, fast_attention.BAND, row_plan.LONG_CALL = piece, band, long_call
    try:
        segment_ids, attention_mask, document_ids, q_len = layout
        assert_matches_dense(segment_ids, attention_mask, document_ids, q_len, kernel)
    finally:
        fast_attention.PIECE, fast_attention.BAND, row_plan.LONG_CALL = 3, 2, saved


def test_one_causal_call_when_the_batch_shares_a_causal_stretch(monkeypatch):
    """Short segments only (the plan is one causal call plus reversed squares, see test_attention_plan)."""
    monkeypatch.setattr(fast_attention, "PIECE", 4)
    row = [0, 0, -1, 1, 1, 1, -1, -1, 2, 2, 2, -1, -1, -1, -1, -1]
    assert_matches_dense(torch.tensor([row, row]))
    assert_matches_dense(torch.tensor([row, row[::-1]]))


@pytest.mark.parametrize("name", INEXPRESSIBLE)
def test_inexpressible_layouts_fall_back_exactly(name, caplog):
    segment_ids, attention_mask, document_ids = inexpressible(name)
    assert plan_layout(segment_ids, attention_mask, document_ids, 5) is None
    q, k, v, grad = random_qkv(1, 5, 5)
    fast_attention._log_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="segmask.fast_attention"):
        for _ in range(2):
            fast = outputs_and_grads(
                lambda *t: mas_attention(*t, segment_ids, attention_mask, document_ids), q, k, v, grad
            )
    assert len([r for r in caplog.records if "dense MAS mask" in r.getMessage()]) == 1
    dense = outputs_and_grads(
        lambda *t: reference(*t, segment_ids, attention_mask, document_ids), q, k, v, grad
    )
    for a, b in zip(fast, dense):
        assert torch.equal(a, b)


def test_bfloat16_close_to_float32():
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1, -1]])
    q, k, v, grad = random_qkv(1, 12, 12)
    exact = outputs_and_grads(lambda *t: mas_attention(*t, segment_ids), q, k, v, grad)
    low = outputs_and_grads(
        lambda *t: mas_attention(*t, segment_ids), *(t.bfloat16() for t in (q, k, v, grad))
    )
    for a, b in zip(exact, low):
        assert b.dtype == torch.bfloat16
        assert (a - b.float()).abs().max() < 0.1


def test_bad_input_raises_value_error():
    q, k, v, _ = random_qkv(1, 4, 4)
    with pytest.raises(ValueError, match="segment_ids has shape"):
        mas_attention(q, k, v, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        mas_attention(
            q, k[:, :1].expand(1, 3, 4, 8), v[:, :1].expand(1, 3, 4, 8), torch.zeros(1, 4, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="queries but only"):
        mas_attention(torch.randn(1, 4, 6, 8), k, v, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_ids must be >= 0"):
        Layout(torch.tensor([[0, -2]]))


# ------------------------------------------------------------------------------------ the kernel seam


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_the_cuda_kernel_without_cuda_raises():
    q, k, v, _ = random_qkv(1, 4, 4)
    with pytest.raises(kernels.KernelUnavailable, match="cuda-flash kernel needs CUDA"):
        mas_attention(q, k, v, torch.zeros(1, 4, dtype=torch.long), kernel="cuda-flash")


def test_a_changed_flash_operator_raises(monkeypatch):
    """The merge relies on the CPU operator's lse being [B, H, Q] float32: anything else raises, naming it."""
    real = kernels._FLASH_CPU

    def changed(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out, lse.transpose(1, 2)  # as if the operator now returned [B, Q, H]

    monkeypatch.setattr(kernels, "_FLASH_CPU", changed)
    q, k, v, _ = random_qkv(1, 5, 5, 2, 2)
    with pytest.raises(kernels.KernelChangedError, match=r"log-sum-exp \[B, H, Q\] float32"):
        mas_attention(q, k, v, torch.tensor([[0, 0, 1, -1, -1]]))


class CountingKernel:
    """A kernel that counts its forward and backward calls (through the seam every call goes through)."""

    def __init__(self, inner=kernels.CPU_FLASH, masked=False):
        self.forward_calls = self.backward_calls = 0

        def forward(*args):
            self.forward_calls += 1
            return inner.forward(*args)

        def backward(*args):
            self.backward_calls += 1
            return inner.backward(*args)

        self.kernel = kernels.Kernel("counting", forward, backward, inner.device, masked=masked)


# ------------------------------------------------------------------------- many short segments


def few_shot(seq_len: int, seed: int, answer=(1, 8)) -> list[int]:
    """Few-shot examples: segments of 8-32 tokens, each followed by a short causal answer."""
    rng = random.Random(seed)
    ids, segment = [], 0
    while len(ids) < seq_len:
        ids += [segment] * rng.randint(8, 32) + [-1] * rng.randint(*answer)
        segment += 1
    return ids[:seq_len]


def chat(seq_len: int, seed: int) -> list[int]:
    """A 32-token system segment, then user segments and causal answers of 16-128 tokens."""
    rng = random.Random(seed)
    ids, segment = [0] * 32, 1
    while len(ids) < seq_len:
        ids += [segment] * rng.randint(16, 128) + [-1] * rng.randint(16, 128)
        segment += 1
    return ids[:seq_len]


def _many_short(name: str):
    """``(segment_ids, attention_mask, document_ids)`` of a realistic many-short-segment batch."""
    L = 384
    if name == "few-shot":
        return torch.tensor([few_shot(L, 0)]), None, None
    if name == "few-shot, rows differ":
        return torch.tensor([few_shot(L, seed) for seed in range(3)]), None, None
    if name == "few-shot, padded":
        rows = torch.tensor(
            [few_shot(L, 0), [-1] * 40 + few_shot(L - 40, 1), few_shot(L - 24, 2) + [-1] * 24]
        )
        padding = torch.ones(3, L, dtype=torch.long)
        padding[1, :40] = padding[2, L - 24 :] = 0
        return rows, padding, None
    if name == "chat":
        return torch.tensor([chat(L, 0), chat(L, 1)]), None, None
    if name == "packed documents":
        rows = torch.tensor([few_shot(150, 0) + chat(234, 1), chat(200, 2) + few_shot(184, 3)])
        documents = torch.tensor([[0] * 150 + [1] * 234, [0] * 200 + [1] * 184])
        return rows, None, documents
    raise KeyError(name)


MANY_SHORT = ("few-shot", "few-shot, rows differ", "few-shot, padded", "chat", "packed documents")


@pytest.mark.parametrize("blhd", [False, True], ids=["BHLD", "BLHD"])
@pytest.mark.parametrize(
    "kernel, band",
    [("cpu-flash", 256), ("cpu-flash", 64), ("reference", 64), (SQUARES, 256)],
    ids=["cpu-flash", "cpu-flash, band 64", "reference, band 64", "squares"],
)
@pytest.mark.parametrize("name", MANY_SHORT)
def test_many_short_segments_match_dense(monkeypatch, name, kernel, band, blhd):
    """Segments of 8-32 tokens at the real piece (256): band tiles (or, for a kernel without masks, the
    batched reversed squares) and the full blocks merged into them equal the dense mask, forward and
    backward, through either kernel and either memory layout."""
    monkeypatch.setattr(fast_attention, "PIECE", 256)
    monkeypatch.setattr(fast_attention, "BAND", band)
    segment_ids, attention_mask, document_ids = _many_short(name)
    for q_len in (None, 100):
        assert_matches_dense(
            segment_ids, attention_mask, document_ids, q_len, kernel, blhd, q_heads=2, kv_heads=1
        )


@pytest.mark.parametrize("blhd", [False, True], ids=["BHLD", "BLHD"])
@pytest.mark.parametrize("name", ["chat", "few-shot", "prompt"])
def test_long_calls_from_2048_keys_match_dense(monkeypatch, name, blhd):
    """At 2,048 keys (real piece and band: 256) the blocks over the keys before a group of tiles have 768
    rows (groups of three tiles, the first taking the remainder) while band calls keep two tiles, and a
    long segment's rows go as 768 and a remainder: still the dense mask's result, forward and backward,
    also for the last 1,000 queries against a cache."""
    monkeypatch.setattr(fast_attention, "PIECE", 256)
    monkeypatch.setattr(fast_attention, "BAND", 256)
    prompt = [0] * 204 + [1] * 1228 + [-1] * 616
    ids = {"chat": chat(2048, 3), "few-shot": few_shot(2048, 3), "prompt": prompt}[name]
    for q_len in (None, 1000):
        assert_matches_dense(torch.tensor([ids]), q_len=q_len, blhd=blhd, q_heads=2, kv_heads=1, head_dim=8)


@pytest.mark.parametrize("blhd", [False, True], ids=["BHLD", "BLHD"])
def test_output_has_the_layout_sdpa_gives(blhd):
    """The output is laid out as SDPA's for the same query: heads-major for a ``[B, H, L, D]`` query, and
    for a ``[B, L, H, D]`` one (a model's projection, transposed) such that transposing it back to
    ``[B, L, H, D]`` needs no copy."""
    segment_ids = torch.tensor([chat(600, 0)])
    q, k, v, _ = random_qkv(1, 600, 600, 2, 2, 8)
    if blhd:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    with torch.no_grad():
        fast = mas_attention(q, k, v, segment_ids)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert fast.stride() == sdpa.stride()
    assert fast.transpose(1, 2).is_contiguous() == blhd


@pytest.mark.parametrize("batch", [1, 4])
def test_many_equal_short_segments_take_fewer_calls_than_segments(monkeypatch, batch):
    """Through a kernel without a mask (reversed squares): 64 segments of 16 tokens (+ 4 answer tokens) at
    1280 tokens: 1 causal call + 4 batches of 16 reversed squares, forward and backward, counted through
    the kernel seam; 4 such rows, each shifted:
    1 causal call for all rows + 13 batches of at most 20 squares (320 queries, the memory cap), 14 calls
    each way (each row alone would take 11, 44 in all)."""
    monkeypatch.setattr(fast_attention, "PIECE", 256)
    one = sum(([s] * 16 + [-1] * 4 for s in range(64)), [])
    segment_ids = torch.full((batch, 1280), -1)
    for row, shift in enumerate((0, 5, 10, 15)[:batch]):
        segment_ids[row, shift : shift + 1260] = torch.tensor(one[:1260])  # 63 examples
    counting = CountingKernel()
    q, k, v, grad = random_qkv(batch, 1280, 1280, 2, 2, 8)
    fast = outputs_and_grads(lambda *t: mas_attention(*t, segment_ids, kernel=counting.kernel), q, k, v, grad)
    calls = 5 if batch == 1 else 14
    assert (counting.forward_calls, counting.backward_calls) == (calls, calls)
    dense = outputs_and_grads(lambda *t: reference(*t, segment_ids), q, k, v, grad)
    for a, b in zip(fast, dense):
        assert (a - b).abs().max() < TOLERANCE


def test_band_tiles_take_one_masked_call_each_and_a_block_per_crossing(monkeypatch):
    """64 examples of 16 tokens (+ 4 answer tokens) through a kernel that takes a mask: 5 band tiles of 256 queries (one masked call
    each: a tile group holds at most a block's 320 rows), 4 blocks over the keys before a tile, and 3 for the
    examples that cross a tile's end (at 512, 768 and 1024; the one ending at 256 does not cross): 12
    forward calls, 14 backward (whose blocks take at most 640 keys a call, so the blocks over 768 and 1,024
    keys take two), and the dense mask's result."""
    monkeypatch.setattr(fast_attention, "PIECE", 256)
    monkeypatch.setattr(fast_attention, "BAND", 256)
    segment_ids = torch.tensor([sum(([s] * 16 + [-1] * 4 for s in range(64)), [])])
    counting = CountingKernel(masked=True)
    q, k, v, grad = random_qkv(1, 1280, 1280, 2, 2, 8)
    fast = outputs_and_grads(lambda *t: mas_attention(*t, segment_ids, kernel=counting.kernel), q, k, v, grad)
    assert (counting.forward_calls, counting.backward_calls) == (12, 14)
    dense = outputs_and_grads(lambda *t: reference(*t, segment_ids), q, k, v, grad)
    for a, b in zip(fast, dense):
        assert (a - b).abs().max() < TOLERANCE


@pytest.mark.parametrize("kernel", ["cpu-flash", "reference"])
def test_inputs_without_a_row_view_match_dense(kernel):
    """q, k, v whose head dimension is not innermost (no 2-D row view of their memory): the squares'
    gathers and scatters take the advanced-indexing route, and the result still equals the dense mask,
    outputs and gradients, for two rows of many short segments."""
    segment_ids = torch.tensor([[0, 0, 0, -1, 1, 1, 1, 1, -1, -1, 2, 2, -1, 3, 3, 3]] * 2)
    segment_ids[1, 4:8] = -1
    q, k, v, grad = random_qkv(2, 16, 16, 2, 2, 8)
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
    assert reversed_squares.row_view(q) is None
    fast = outputs_and_grads(lambda *t: mas_attention(*t, segment_ids, kernel=kernel), q, k, v, grad)
    dense = outputs_and_grads(lambda *t: reference(*t, segment_ids), q, k, v, grad)
    for a, b in zip(fast, dense):
        assert (a - b).abs().max() < TOLERANCE
