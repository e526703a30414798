"""The MAS attention mask: one rule, several representations.

Every token ``t`` has a segment id ``s(t)`` (``>= 0``: a bidirectional prompt segment, ``-1``: a causal
token), an optional document id ``d(t)`` for packed rows, and a padding flag. The whole mask is::

    token i may attend to token j  iff  j is not padding,  d(i) = d(j),  and ( j <= i  or  s(i) = s(j) >= 0 )

For ``segment_ids = [0, 0, 1, 1, -1, -1]`` (system, user, answer) the mask is::

         kv 0 1 2 3 4 5
    q 0     ■ ■ ⬚ ⬚ ⬚ ⬚      system: sees itself in full
      1     ■ ■ ⬚ ⬚ ⬚ ⬚
      2     ■ ■ ■ ■ ⬚ ⬚      user: sees the system segment and itself in full
      3     ■ ■ ■ ■ ⬚ ⬚
      4     ■ ■ ■ ■ ■ ⬚      answer: causal, never sees a later token
      5     ■ ■ ■ ■ ■ ■

The rule is four named primitives, index functions ``(b, h, q_idx, kv_idx) -> bool`` as in transformers'
``masking_utils``, combined with :func:`and_masks` and :func:`or_masks`::

    mask_function = and_masks(or_masks(causal_function, segment_function(s)), document_function(d),
                              padding_function(attention_mask)[, window_function(sliding_window)])

:func:`mask_function` is the only place they are combined. Everything else (the dense boolean mask, the
additive float mask for eager attention, FlexAttention's ``BlockMask``, the masks handed to transformers
models) evaluates that function; nothing re-derives the rule.

Why not transformers' own construction: ``segment_function`` is exactly ``masking_utils.blockwise_overlay``
(``create_causal_mask(block_sequence_ids=...)``, in every supported release, 5.18 to 5.24), and
``tests/test_masks.py`` checks that the two masks agree on random layouts. Adopting it would lose exactness
on the oldest supported release: transformers 5.18 ORs the block overlay after the packed-sequence mask,
so a segment id found in two packed documents (ids restart per document) attends across them (5.24 ANDs
the documents last, as segmask does). Its sliding-window mask ORs the overlay after the window too (a
segment token sees its whole segment past the window), its packed sequences come from ``position_ids``
and only without padding or a cache (segmask takes ``document_ids`` always), and importing
``masking_utils`` takes longer than torch for commands that only need a policy name. The primitives it
would replace are one line each.

Shapes: ``segment_ids``, ``document_ids`` and ``attention_mask`` are ``[B, K]`` over all key positions.
Queries are the last ``Q`` of those ``K`` positions (``Q == K`` for a full forward, ``Q < K`` when a
prefill continues against a KV cache).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import torch
from torch.nn.attention.flex_attention import create_block_mask

MaskFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def validate_layout(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> None:
    """Raise a ``ValueError`` naming the problem if the token-level ids cannot describe a mask."""
    if not isinstance(segment_ids, torch.Tensor):
        raise ValueError(f"segment_ids must be a torch.Tensor, got {type(segment_ids).__name__}")
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must have shape [batch, seq_len], got {tuple(segment_ids.shape)}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    if segment_ids.numel() and int(segment_ids.min()) < -1:
        raise ValueError("segment_ids must be >= 0 (bidirectional segment) or -1 (causal token)")
    for name, ids in (("attention_mask", attention_mask), ("document_ids", document_ids)):
        if ids is None:
            continue
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.shape != segment_ids.shape:
            raise ValueError(
                f"{name} has shape {tuple(ids.shape)} but segment_ids has shape {tuple(segment_ids.shape)}"
            )


def cuts(segment_ids: Sequence[int]) -> list[int]:
    """Where the sequence may be cut without splitting a segment: the positions ``0 < c <= n`` such that no
    segment id ``>= 0`` occurs both before ``c`` and at ``c`` or later (``n = len(segment_ids)``: always).

    At such a cut no token before ``c`` may see a token at ``c`` or later under the rule, so the keys and
    values before it are final: the leak check perturbs tokens from there, and a KV cache may be kept up to
    there (:func:`reusable_prefix`). A segment id may recur after other tokens; its tokens still see each
    other, so it spans everything in between::

        segment ids  -1  0  0  1  1 -1 -1
        cuts           1     3     5  6  7
    """
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for position, segment in enumerate(segment_ids):
        if segment >= 0:
            first.setdefault(segment, position)
            last[segment] = position
    spanned = [0] * (len(segment_ids) + 1)  # difference array: +1 where a span opens, -1 after it closes
    for segment, start in first.items():
        spanned[start + 1] += 1
        spanned[last[segment] + 1] -= 1
    result, open_spans = [], 0
    for c in range(1, len(segment_ids) + 1):
        open_spans += spanned[c]
        if open_spans == 0:
            result.append(c)
    return result


def reusable_prefix(
    cached_ids: Sequence[int], cached_segments: Sequence[int], ids: Sequence[int], segments: Sequence[int]
) -> int:
    """How many leading KV entries of the ``cached`` sequence stay exact when it is replaced by ``ids``: the
    last common :func:`cuts` position of both sequences within their common prefix (tokens and segment ids
    equal), else 0. Beyond it a cached token saw, or would have to see, tokens that changed."""
    common = 0
    for old_id, old_segment, new_id, new_segment in zip(cached_ids, cached_segments, ids, segments):
        if old_id != new_id or old_segment != new_segment:
            break
        common += 1
    shared = set(cuts(cached_segments)).intersection(cuts(segments))
    return max((c for c in shared if c <= common), default=0)


def causal_function(
    b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
) -> torch.Tensor:
    """Causal: a query sees itself and every earlier key (transformers' ``causal_mask_function``)::

    ■ ⬚ ⬚
    ■ ■ ⬚
    ■ ■ ■
    """
    return kv_idx <= q_idx


def segment_function(segment_ids: torch.Tensor) -> MaskFunction:
    """Segments: a query of segment ``s >= 0`` sees every key of the same segment, later ones included; a
    causal token (``-1``) sees nothing through this clause. ``segment_ids`` ``[B, K]``. For ``[0, 0, -1]``::

        ■ ■ ⬚
        ■ ■ ⬚
        ⬚ ⬚ ⬚

    The same clause as transformers' ``blockwise_overlay(block_sequence_ids)``.
    """

    def segment(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        s_q = segment_ids[b, q_idx]
        return (s_q == segment_ids[b, kv_idx]) & (s_q >= 0)

    return segment


def document_function(document_ids: torch.Tensor) -> MaskFunction:
    """Documents: a query sees only keys of its own document (``document_ids`` ``[B, K]``, packed rows).
    For ``[0, 0, 1]``::

        ■ ■ ⬚
        ■ ■ ⬚
        ⬚ ⬚ ■
    """

    def document(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return document


def padding_function(attention_mask: torch.Tensor) -> MaskFunction:
    """Padding: no query sees a padded key (``attention_mask`` ``[B, K]``: 1 real, 0 padding).
    For ``[0, 1, 1]``::

    ⬚ ■ ■
    ⬚ ■ ■
    ⬚ ■ ■
    """
    padding = attention_mask.bool()

    def real(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return padding[b, kv_idx]

    return real


def window_function(sliding_window: int) -> MaskFunction:
    """A sliding window of ``sliding_window`` positions on each side: ``|q_idx - kv_idx| < sliding_window``.

    For causal tokens this is exactly transformers' ``sliding_window_overlay``; for bidirectional segment
    tokens it keeps the same reach towards later keys.
    """
    if sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")

    def window(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx - kv_idx < sliding_window) & (kv_idx - q_idx < sliding_window)

    return window


def and_masks(*functions: MaskFunction) -> MaskFunction:
    """The intersection of mask functions: a pair is allowed where every one allows it."""
    return _fold(operator.and_, functions)


def or_masks(*functions: MaskFunction) -> MaskFunction:
    """The union of mask functions: a pair is allowed where any one allows it."""
    return _fold(operator.or_, functions)


def _fold(combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], functions: tuple) -> MaskFunction:
    """One mask function that folds ``functions``' answers with ``combine`` (``&`` or ``|``)."""
    if not functions:
        raise ValueError("combining mask functions needs at least one")

    def combined(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return functools.reduce(combine, (fn(b, h, q_idx, kv_idx) for fn in functions))

    return combined


def mask_function(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> MaskFunction:
    """The MAS rule as an index function ``(b, h, q_idx, kv_idx) -> bool``: causal or same segment, within
    the document, never a padded key (the primitives above; the module docstring draws the result), and
    with ``sliding_window`` within that window.

    ``q_idx`` and ``kv_idx`` are absolute positions in ``[0, K)``. The function only indexes and compares
    tensors, so it works element-wise, with broadcast index tensors, under ``torch.vmap``, inside
    transformers' ``masking_utils`` and as a FlexAttention ``mask_mod``.
    """
    validate_layout(segment_ids, attention_mask, document_ids)
    rule = or_masks(causal_function, segment_function(segment_ids))
    if document_ids is not None:
        rule = and_masks(rule, document_function(document_ids))
    if attention_mask is not None:
        rule = and_masks(rule, padding_function(attention_mask))
    if sliding_window is not None:
        rule = and_masks(rule, window_function(sliding_window))
    return rule


def offset_queries(function: MaskFunction, q_offset: int) -> MaskFunction:
    """Shift query indices by ``q_offset`` (queries are the last ``Q`` of ``K`` positions)."""
    if q_offset == 0:
        return function

    def shifted(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return function(b, h, q_idx + q_offset, kv_idx)

    return shifted


def evaluate(
    function: MaskFunction, batch_size: int, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor:
    """Evaluate a mask function on the grid of the last ``q_len`` of ``kv_len`` positions: ``[B, 1, Q, K]`` bool."""
    b = torch.arange(batch_size, device=device)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(kv_len - q_len, kv_len, device=device)[None, None, :, None]
    kv = torch.arange(kv_len, device=device)[None, None, None, :]
    return function(b, h, q, kv).expand(batch_size, 1, q_len, kv_len)


def dense(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    q_len: int | None = None,
    sliding_window: int | None = None,
    kv_offset: int = 0,
    kv_len: int | None = None,
) -> torch.Tensor:
    """The rule, optionally within a sliding window, as a boolean ``[B, 1, Q, kv_len]`` view over some keys.

    ``segment_ids``, ``attention_mask`` and ``document_ids`` are ``[B, K]``; the queries are the last
    ``q_len`` of the ``K`` positions (default: all). The keys are positions ``[kv_offset, kv_offset +
    kv_len)`` (default: from ``kv_offset`` to ``K``), as a KV cache holds them: a sliding-window layer keeps
    only its last keys, a static cache has unused slots after the real tokens, which are never attended
    (False). Every backend's dense mask is this one composition; the result may be a broadcast view.
    """
    validate_layout(segment_ids, attention_mask, document_ids)
    batch_size, full_len = segment_ids.shape
    q_len = full_len if q_len is None else q_len
    if not 0 < q_len <= full_len:
        raise ValueError(f"q_len must be in [1, {full_len}], got {q_len}")
    function = mask_function(segment_ids, attention_mask, document_ids, sliding_window)
    mask = evaluate(function, batch_size, q_len, full_len, segment_ids.device)
    kv_len = full_len - kv_offset if kv_len is None else kv_len
    mask = mask[..., kv_offset : kv_offset + kv_len]
    if mask.shape[-1] < kv_len:
        mask = torch.nn.functional.pad(mask, (0, kv_len - mask.shape[-1]), value=False)
    return mask


def dense_mask(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    q_len: int | None = None,
) -> torch.Tensor:
    """The MAS mask as a boolean tensor ``[B, 1, Q, K]``, True where attention is allowed.

    ``segment_ids``, ``attention_mask`` (1 real, 0 padding) and ``document_ids`` are ``[B, K]``; the
    queries are the last ``q_len`` positions (default: all ``K``). This is the exact rule: a padded query
    row may be all False. Use :func:`attention_bias` or :func:`sdpa_mask` to feed an attention kernel.
    """
    return dense(segment_ids, attention_mask, document_ids, q_len).contiguous()


def never_empty(mask: torch.Tensor) -> torch.Tensor:
    """Let each query row with no allowed key attend to its own position, so no kernel returns NaN.

    Such rows only occur for padded queries, whose outputs are ignored. ``mask`` is ``[B, 1, Q, K]`` bool
    with queries at the last ``Q`` positions.
    """
    q_len, kv_len = mask.shape[-2:]
    empty = ~mask.any(dim=-1, keepdim=True)
    if not bool(empty.any()):
        return mask
    diagonal = torch.zeros(q_len, kv_len, dtype=torch.bool, device=mask.device)
    diagonal[torch.arange(q_len), torch.arange(kv_len - q_len, kv_len)] = True
    return mask | (empty & diagonal)


def sdpa_mask(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    q_len: int | None = None,
) -> torch.Tensor:
    """Boolean ``[B, 1, Q, K]`` mask for ``scaled_dot_product_attention``: :func:`dense_mask` without empty rows."""
    return never_empty(dense_mask(segment_ids, attention_mask, document_ids, q_len))


def to_additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask to additive bias: 0 where allowed, the dtype's minimum where not (empty rows made safe)."""
    mask = never_empty(mask)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def attention_bias(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    q_len: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive float mask ``[B, 1, Q, K]`` for eager attention (a boolean mask added there masks nothing)."""
    return to_additive(dense_mask(segment_ids, attention_mask, document_ids, q_len), dtype)


def block_mask(
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    q_len: int | None = None,
    sliding_window: int | None = None,
    block_size: int = 128,
):
    """FlexAttention ``BlockMask`` for the rule (optionally within a sliding window), never materialising L x L."""
    validate_layout(segment_ids, attention_mask, document_ids)
    batch_size, kv_len = segment_ids.shape
    q_len = kv_len if q_len is None else q_len
    fn = mask_function(segment_ids, attention_mask, document_ids, sliding_window)
    return create_block_mask(
        offset_queries(fn, kv_len - q_len),
        B=batch_size,
        H=None,
        Q_LEN=q_len,
        KV_LEN=kv_len,
        device=segment_ids.device,
        BLOCK_SIZE=block_size,
    )


def draw(mask: torch.Tensor) -> str:
    """Draw one ``[Q, K]`` boolean mask with ■ (attends) and ⬚ (masked), one query per line."""
    if mask.ndim != 2:
        raise ValueError(f"draw takes one [Q, K] mask, got shape {tuple(mask.shape)}")
    return "\n".join(" ".join("■" if allowed else "⬚" for allowed in row) for row in mask.tolist())
