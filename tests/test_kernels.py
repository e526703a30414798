"""segmask.kernels: each kernel's output, log-sum-exp and gradient shares, and the torch operators they rely on."""

from __future__ import annotations

import pytest
import torch

from segmask import kernels

pytestmark = pytest.mark.exactness

TOLERANCE = 1e-5


def random_qkv(batch, length, q_heads, kv_heads, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, length, head_dim, generator=generator)
    k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=generator) for _ in range(2))
    grad = torch.randn(batch, q_heads, length, head_dim, generator=generator)
    return q, k, v, grad


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "head dim strided"])
def test_reference_kernel_equals_cpu_flash(strided):
    """Both kernels' outputs, log-sum-exps and backward (given another call's merged output and lse), also
    for inputs whose head dimension is not contiguous, which torch's flash operators misread unguarded."""
    q, k, v, grad = random_qkv(2, 12, 3, 3)
    if strided:
        q, k, v, grad = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v, grad))
        assert q.stride(-1) != 1
    for causal in (False, True):
        flash = kernels.CPU_FLASH.forward(q, k, v, causal, 0.3)
        ref = kernels.REFERENCE.forward(q, k, v, causal, 0.3)
        for a, b in zip(flash, ref):
            assert (a - b).abs().max() < TOLERANCE
        # a merged output and lse over more keys than this call's: each backward returns its share
        out, lse = flash[0] * 0.5, flash[1] + 0.7
        if strided:
            out = out.transpose(-1, -2).contiguous().transpose(-1, -2)
        for a, b in zip(
            kernels.CPU_FLASH.backward(grad, q, k, v, out, lse, causal, 0.3),
            kernels.REFERENCE.backward(grad, q, k, v, out, lse, causal, 0.3),
        ):
            assert (a - b).abs().max() < TOLERANCE


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_masked_kernels_equal_sdpa_with_the_mask(kv_heads):
    """Both masked kernels take an additive ``[B, 1, Q, K]`` mask, also one broadcast over the batch (stride
    0, as the fast path passes one tile's mask to every row): the output is SDPA's with that mask, the
    log-sum-exp is over the seen keys only, and each backward is its share of a merged output's gradients."""
    assert kernels.CPU_FLASH.masked and kernels.REFERENCE.masked and not kernels.CUDA_FLASH.masked
    q, k, v, grad = random_qkv(3, 10, 4, kv_heads)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.rand(1, 1, 10, 10, generator=generator) < 0.6
    hidden[..., torch.arange(10), torch.arange(10)] = False  # every query sees at least one key
    mask = torch.zeros(1, 1, 10, 10).masked_fill_(hidden, float("-inf")).expand(3, -1, -1, -1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=~hidden, scale=0.3, enable_gqa=True
    )
    k_rep, v_rep = (t.repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))
    scores = (q @ k_rep.transpose(-1, -2) * 0.3).masked_fill(hidden, float("-inf"))
    for kernel, keys, values in ((kernels.CPU_FLASH, k, v), (kernels.REFERENCE, k_rep, v_rep)):
        out, lse = kernel.forward(q, keys, values, False, 0.3, mask)
        assert (out - expected).abs().max() < TOLERANCE
        assert (lse - torch.logsumexp(scores, -1)).abs().max() < TOLERANCE
    merged_out, merged_lse = out * 0.5, lse + 0.7
    flash = kernels.CPU_FLASH.backward(grad, q, k, v, merged_out, merged_lse, False, 0.3, mask)
    ref = kernels.REFERENCE.backward(grad, q, k_rep, v_rep, merged_out, merged_lse, False, 0.3, mask)
    assert (flash[0] - ref[0]).abs().max() < TOLERANCE
    for grouped, repeated in zip(flash[1:], ref[1:]):
        assert (grouped - repeated.unflatten(1, (kv_heads, -1)).sum(2)).abs().max() < TOLERANCE
    with pytest.raises(ValueError, match="a masked call takes causal=False and a mask"):
        kernels.CPU_FLASH.forward(q, k, v, True, 0.3, mask)
    with pytest.raises(ValueError, match="a masked call takes causal=False and a mask"):
        kernels.REFERENCE.forward(q, k_rep, v_rep, False, 0.3, mask[:, :, :5])


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_flash_takes_grouped_heads_as_repeated_ones(causal, kv_heads):
    """The CPU flash kernel is marked ``grouped``: its torch operators take k, v with fewer heads, query
    head h reading key/value head h // repeats, and return dk, dv summed over each group. Checked against
    the same operators on repeated heads, so a torch that changes this fails here."""
    assert kernels.CPU_FLASH.grouped and not kernels.REFERENCE.grouped
    q, k, v, grad = random_qkv(2, 10, 6, kv_heads)
    repeats = 6 // kv_heads
    k_rep, v_rep = (t.repeat_interleave(repeats, dim=1) for t in (k, v))
    out, lse = kernels.CPU_FLASH.forward(q, k, v, causal, 0.3)
    out_rep, lse_rep = kernels.CPU_FLASH.forward(q, k_rep, v_rep, causal, 0.3)
    assert (out - out_rep).abs().max() < TOLERANCE
    assert (lse - lse_rep).abs().max() < TOLERANCE
    merged_out, merged_lse = out * 0.5, lse + 0.7  # as if other calls had merged into these queries
    dq, dk, dv = kernels.CPU_FLASH.backward(grad, q, k, v, merged_out, merged_lse, causal, 0.3)
    dq_rep, dk_rep, dv_rep = kernels.CPU_FLASH.backward(
        grad, q, k_rep, v_rep, merged_out, merged_lse, causal, 0.3
    )
    assert dk.shape == k.shape and dv.shape == v.shape
    assert (dq - dq_rep).abs().max() < TOLERANCE
    for grouped, repeated in ((dk, dk_rep), (dv, dv_rep)):
        assert (grouped - repeated.unflatten(1, (kv_heads, repeats)).sum(2)).abs().max() < TOLERANCE


def test_a_changed_flash_backward_raises(monkeypatch):
    """The gradients are added into k and v's own shapes: an operator that stopped summing over query
    groups raises, naming the assumption."""
    real = kernels._FLASH_CPU_BACKWARD

    def changed(*args, **kwargs):
        dq, dk, dv = real(*args, **kwargs)
        return dq, dk.repeat_interleave(2, dim=1), dv.repeat_interleave(2, dim=1)  # per query head

    monkeypatch.setattr(kernels, "_FLASH_CPU_BACKWARD", changed)
    q, k, v, grad = random_qkv(1, 5, 4, 2)
    out, lse = kernels.CPU_FLASH.forward(q, k, v, True, 0.3)
    with pytest.raises(kernels.KernelChangedError, match="summed over query groups"):
        kernels.CPU_FLASH.backward(grad, q, k, v, out, lse, True, 0.3)


def test_default_kernel_is_cpu_flash_and_cuda_is_never_the_default():
    assert kernels.select(torch.device("cpu")) is kernels.CPU_FLASH
    with pytest.raises(
        kernels.KernelUnavailable, match="no segment-blocked kernel is enabled by default on cuda"
    ):
        kernels.select(torch.device("cuda"))
    with pytest.raises(kernels.KernelUnavailable, match="unknown kernel 'triton'"):
        kernels.select(torch.device("cpu"), "triton")
