"""Per-device attention kernels that also return the log-sum-exp: the one device-dependent part of the fast path.

The segment-blocked plan (:mod:`segmask.attention_plan`) is pure and device-neutral; what runs each of its
pieces is a :class:`Kernel`, two small functions per device:

    forward(q, k, v, causal, scale, mask=None) -> (out, lse)
        q ``[B, H, Q, D]``, k and v ``[B, H, K, D]`` (same heads, or fewer for a ``grouped`` kernel);
        every query sees every key, or, when ``causal`` (then ``Q == K``), query ``i`` sees keys ``<= i``,
        or, with ``mask`` (a ``masked`` kernel only; ``[B, 1, Q, K]`` additive in q's dtype: 0 where a key is
        seen, ``-inf`` or the dtype's minimum where not, at least one key seen per query), the keys where it is 0.
        Returns out ``[B, H, Q, D]`` in q's dtype and the log-sum-exp ``lse [B, H, Q]`` float32 of each
        query's scaled scores.
    backward(grad_out, q, k, v, out, lse, causal, scale, mask=None) -> (dq, dk, dv)
        Given the MERGED output and log-sum-exp of every call covering these queries, exactly this call's
        share of the gradients (as in ring attention), in q's dtype.

Kernels (choose with :func:`select`; the default for a device is the only place one is picked):

    cpu-flash   torch's CPU flash-attention operators, the ones SDPA itself dispatches to on CPU: the default
    reference   plain PyTorch (matmul + logsumexp, float32 accumulation), any device; for tests, L x L memory
    cuda-flash  torch's CUDA flash-attention operators (fp16 / bf16). NOT the default: no CUDA machine has
                run it yet, so it runs only when asked for by name (``benchmarks/gpu.sh`` checks it)

Every torch internal a kernel leans on (operator names, the log-sum-exp's shape and dtype) is checked at
run time; a mismatch raises :class:`KernelChangedError` naming the assumption.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


class KernelChangedError(RuntimeError):
    """A torch operator a kernel relies on is missing or no longer returns what the kernel assumes."""


class KernelUnavailable(ValueError):
    """No kernel of this name (or none by default) for this device."""


@dataclass(frozen=True)
class Kernel:
    """One device's attention kernel: see the module docstring for the two functions' contracts."""

    name: str
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    device: str | None
    """The device type it runs on; None: any."""
    masked: bool = False
    """Whether it takes an additive ``mask`` (the plan's :class:`segmask.row_plan.Band` tiles need one;
    without it the plan uses reversed squares instead)."""
    grouped: bool = False
    """Whether it takes grouped-query attention as is: k and v with fewer heads than q (a divisor of them;
    query head ``h`` reads key/value head ``h // (Hq // Hkv)``), and ``dk, dv`` summed over each group.
    Otherwise the caller repeats k and v to q's heads."""


def _check_output(name: str, q: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Raise unless ``out`` is ``[B, H, Q, D]`` and ``lse`` ``[B, H, Q]`` float32, as the merge assumes."""
    if out.shape != q.shape or lse.shape != q.shape[:3] or lse.dtype != torch.float32:
        raise KernelChangedError(
            f"{name} returned output {tuple(out.shape)} and log-sum-exp {tuple(lse.shape)} {lse.dtype} for "
            f"query {tuple(q.shape)}; segmask assumes output [B, H, Q, D] and log-sum-exp [B, H, Q] float32 "
            f"(this torch version changed the operator)"
        )
    return out, lse


def _check_call(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None = None) -> None:
    """Raise unless the call is one the contract allows: causal with as many queries as keys, or masked
    (not causal) with a ``[B, 1, Q, K]`` mask."""
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"a causal call needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    if mask is not None and (causal or mask.shape != (q.shape[0], 1, q.shape[2], k.shape[2])):
        raise ValueError(
            f"a masked call takes causal=False and a mask [B, 1, Q, K] = {[q.shape[0], 1, q.shape[2], k.shape[2]]}, "
            f"got causal={causal} and {tuple(mask.shape)}"
        )


# --------------------------------------------------------------------------------------------- CPU flash

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _unit_stride(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors with their last dimension contiguous (copied only where it is not): torch's CPU flash
    operators read the head dimension as contiguous without checking, and return wrong numbers (not an
    error) for a tensor whose head dimension is strided (``tests/test_kernels.py`` shows it)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _cpu_flash_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    _check_call(q, k, causal, mask)
    q, k, v = _unit_stride(q, k, v)
    out, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    return _check_output("aten._scaled_dot_product_flash_attention_for_cpu", q, out, lse)


def _cpu_flash_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_call(q, k, causal, mask)
    grad_out, q, k, v, out = _unit_stride(grad_out, q, k, v, out)
    grads = _FLASH_CPU_BACKWARD(grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
    if tuple(g.shape for g in grads) != (q.shape, k.shape, v.shape):
        raise KernelChangedError(
            f"aten._scaled_dot_product_flash_attention_for_cpu_backward returned gradients of shapes "
            f"{[tuple(g.shape) for g in grads]} for q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
            f"segmask assumes each gradient has its input's shape, summed over query groups (this torch "
            f"version changed the operator)"
        )
    return grads


# torch's CPU flash operators take grouped-query attention natively (k, v with fewer heads), forward and
# backward, as SDPA's enable_gqa uses them; tests/test_kernels.py checks it against repeated heads
CPU_FLASH = Kernel("cpu-flash", _cpu_flash_forward, _cpu_flash_backward, "cpu", masked=True, grouped=True)


# --------------------------------------------------------------------------------------------- reference


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float, mask: Tensor | None) -> Tensor:
    """Scaled scores ``[B, H, Q, K]`` in float32, ``-inf`` above the diagonal when causal, plus ``mask``."""
    _check_call(q, k, causal, mask)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        above = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return scores if mask is None else scores + mask.float()


def _reference_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    scores = _scores(q, k, causal, scale, mask)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def _reference_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    # this call's probabilities under the merged softmax, then the usual softmax backward, whose row term
    # (grad_out . out) is that of the merged output
    probs = torch.exp(_scores(q, k, causal, scale, mask) - lse.float().unsqueeze(-1))
    grad_out = grad_out.float()
    grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
    grad_probs = torch.matmul(grad_out, v.float().transpose(-1, -2))
    row = (grad_out * out.float()).sum(-1, keepdim=True)
    grad_scores = probs * (grad_probs - row) * scale
    grad_q = torch.matmul(grad_scores, k.float())
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q.float())
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


REFERENCE = Kernel("reference", _reference_forward, _reference_backward, None, masked=True)


# -------------------------------------------------------------------------------------------- CUDA flash
# Untested: no CUDA machine has run it. select() gives it only by name, never by default.

_FLASH_CUDA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
_FLASH_CUDA_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_backward", None)


def _cuda_flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    _check_call(q, k, causal)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the cuda-flash kernel needs float16 or bfloat16 inputs, got {q.dtype}")
    out, lse = _FLASH_CUDA(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return _check_output("aten._scaled_dot_product_flash_attention", q, out, lse)


def _cuda_flash_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    # dropout 0: the random-state arguments are not read; no cumulative lengths (not varlen)
    empty = q.new_empty(0, dtype=torch.int64)
    grads = _FLASH_CUDA_BACKWARD(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        lse.contiguous(),
        empty,
        empty,
        q.shape[2],
        k.shape[2],
        0.0,
        causal,
        empty,
        empty,
        scale=scale,
    )
    return grads[0], grads[1], grads[2]


CUDA_FLASH = Kernel("cuda-flash", _cuda_flash_forward, _cuda_flash_backward, "cuda")

KERNELS = {kernel.name: kernel for kernel in (CPU_FLASH, REFERENCE, CUDA_FLASH)}


def select(device: torch.device, name: str | None = None) -> Kernel:
    """The kernel ``name`` for ``device`` (None: the device's default), or raise :class:`KernelUnavailable`.

    The default is ``cpu-flash`` on CPU and nothing elsewhere: the CUDA kernel is untested, so it runs only
    when named."""
    device = torch.device(device)
    if name is None:
        if device.type != "cpu":
            raise KernelUnavailable(
                f"no segment-blocked kernel is enabled by default on {device.type} (the cuda-flash kernel is "
                f"untested; name it to use it)"
            )
        name = CPU_FLASH.name
    if name not in KERNELS:
        raise KernelUnavailable(f"unknown kernel {name!r}; choose one of {sorted(KERNELS)}")
    kernel = KERNELS[name]
    if kernel.device == "cuda" and not torch.cuda.is_available():
        raise KernelUnavailable(f"the {name} kernel needs CUDA, and torch.cuda.is_available() is False here")
    if kernel.device is not None and kernel.device != device.type:
        raise KernelUnavailable(f"the {name} kernel runs on {kernel.device}, not on {device.type}")
    operators = {
        "cpu-flash": (_FLASH_CPU, _FLASH_CPU_BACKWARD),
        "cuda-flash": (_FLASH_CUDA, _FLASH_CUDA_BACKWARD),
    }.get(name, ())
    if any(op is None for op in operators):
        raise KernelUnavailable(f"this torch has no flash-attention operator for the {name} kernel")
    return kernel
