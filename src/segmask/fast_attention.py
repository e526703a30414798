"""Exact MAS attention without an L x L mask: unmasked and causal kernel calls over contiguous slices.

Under the MAS rule (:func:`segmask.masks.mask_function`) every query sees ONE contiguous key range when
segments, documents and padding are contiguous: a token of a prompt segment sees its document up to the
end of its segment, a causal token its document up to itself. So the mask is a union of rectangles and
causal triangles, each one kernel call (the reversed squares of many short segments batched into few
calls, over every row of the batch), and no call computes a masked pair except inside the diagonal tiles
of a causal square (as causal attention itself does)::

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

That drawing is the plan for a kernel without a mask. With one (torch's CPU flash operators take an
additive mask, as does the reference kernel) a stretch of short segments is cut into tiles of
:data:`BAND` queries instead: one masked call for the diagonal tiles of many (strided views of q, k and
v, no gathers), full blocks for the keys before them, and no reversed squares
(:mod:`segmask.row_plan` draws it).

A query covered by several calls (P and C, C and U, a tile and its blocks) gets their softmaxes merged
through their log-sum-exps, which public ``scaled_dot_product_attention`` does not return; each call
therefore goes to a :class:`segmask.kernels.Kernel` (on CPU the flash-attention operators SDPA itself
dispatches to, which return the log-sum-exp), all inside one ``autograd.Function``. The backward of each
call, given the merged output and log-sum-exp, is exactly that call's share of the gradients (as in ring
attention). Calls have
at most a quarter of the sequence as query rows (blocks 768 where that is at most 3/8 of it), which keeps
the extra memory to a fraction of the output; nothing grows as L x L.

Where this is not exact or not available (a segment id repeated inside a document, padding or a document
split in the middle of a row, dropout, a device without a default kernel, tracing) :func:`mas_attention`
logs the reason once and runs SDPA with the dense mask of :func:`segmask.masks.sdpa_mask` instead.

The calls (which kernel calls, over which rows and ranges) come from :mod:`segmask.attention_plan`; the
kernel that runs each from :mod:`segmask.kernels`; the gathers of the reversed squares from
:mod:`segmask.reversed_squares`; :mod:`segmask.planned_attention` runs the calls on the kernel, forward and
backward; this module chooses the route (the plan on a kernel, or the dense mask). Pure torch: layers of a
transformers model reach it through :func:`segmask.hook.segmask_attention_forward`, the attention
implementation ``"segmask"``.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from segmask import kernels
from segmask.attention_plan import Layout
from segmask.kernels import Kernel
from segmask.planned_attention import run_calls
from segmask.row_plan import BAND, PIECE, quarter_rows

logger = logging.getLogger(__name__)

# ------------------------------------------------------ the route: the plan on a kernel, or the dense mask


@functools.cache
def _log_fallback(reason: str) -> None:
    logger.warning("segmask fast attention: %s; using SDPA with a dense MAS mask", reason)


def _check_shapes(query: Tensor, key: Tensor, value: Tensor, segment_ids: Tensor) -> None:
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


def _choose_kernel(query: Tensor, kernel: str | Kernel | None) -> Kernel | str:
    """The kernel to run (``kernel`` itself, the named one, or the device's default), or why there is none.

    A kernel asked for by name that cannot run here raises: only the default falls back."""
    if isinstance(kernel, Kernel):
        return kernel
    try:
        return kernels.select(query.device, kernel)
    except kernels.KernelUnavailable as error:
        if kernel is not None:
            raise
        return str(error)


def _fast_path_blocker(query: Tensor, key: Tensor, value: Tensor, dropout: float) -> str | None:
    """Why the segment-blocked kernel cannot run on these inputs, or None if it can."""
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
    layout: Layout,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The reference route: SDPA with the dense ``[B, 1, Q, K]`` MAS mask (optionally within a sliding window).

    Same shapes as :func:`mas_attention`; for a sliding window the key positions are the last ``key.shape[2]``
    of the ``K`` positions the layout's ids cover.
    """
    kv_offset = layout.segment_ids.shape[1] - key.shape[2]
    mask = layout.dense(query.shape[2], sliding_window, kv_offset, key.shape[2], query.device)
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa
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
    kernel: str | Kernel | None = None,
) -> torch.Tensor:
    """MAS attention, exactly SDPA with :func:`segmask.masks.sdpa_mask`, without building an L x L mask.

    ``query``: ``[B, Hq, Q, D]``, the last ``Q`` of the ``K`` positions; ``key``, ``value``: ``[B, Hkv, K, D]``
    with ``Hq`` a multiple of ``Hkv`` (grouped-query attention); ``segment_ids``, ``attention_mask`` (1 real,
    0 padding) and ``document_ids``: ``[B, K]``. Returns ``[B, Hq, Q, D]``. A padded query that sees no key
    attends to itself. Differentiable in ``query``, ``key`` and ``value``.

    ``kernel``: a :class:`segmask.kernels.Kernel` or its name (``"cpu-flash"``, ``"reference"``,
    ``"cuda-flash"``); None: the device's default (CPU flash on CPU; elsewhere none, so SDPA with the
    dense mask). A named kernel that cannot run on this device raises.
    """
    layout = Layout(segment_ids, attention_mask, document_ids)  # validates the ids
    return layout_attention(query, key, value, layout, scaling, dropout, kernel)


def layout_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: Layout,
    scaling: float | None = None,
    dropout: float = 0.0,
    kernel: str | Kernel | None = None,
) -> Tensor:
    """:func:`mas_attention` over a :class:`Layout`, whose plan is computed once for all the calls sharing it.
    Under autocast q, k and v take its dtype, as SDPA's do (rotary embeddings give float32 q, k, bf16 v)."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    _check_shapes(query, key, value, layout.segment_ids)
    chosen = _choose_kernel(query, kernel)
    reason = chosen if isinstance(chosen, str) else _fast_path_blocker(query, key, value, dropout)
    calls = None
    if reason is None:
        calls = layout.calls(query.shape[2], PIECE, BAND if chosen.masked else 0)
        if calls is None:
            reason = "a segment id repeats within a document, or padding or a document is not contiguous"
    if reason is not None:
        _log_fallback(reason)
        return dense_attention(query, key, value, layout, scaling, dropout)
    if key.shape[1] != query.shape[1] and not chosen.grouped:
        # grouped-query attention for a kernel that needs as many key/value heads as query heads
        key, value = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (key, value))
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    size = quarter_rows(key.shape[2], PIECE)
    band_mask = functools.partial(layout.band_mask, dtype=query.dtype, device=query.device)
    return run_calls(query, key, value, calls, scale, size, chosen, band_mask)
