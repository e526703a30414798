"""Batching: pad (or pack) encoded examples into the tensors a MAS-enabled model takes.

Example::

    batch = Collator(tokenizer, padding_side="left")([encoded_a, encoded_b])
    sorted(batch)  # ['attention_mask', 'input_ids', 'labels', 'position_ids', 'segment_ids']

The one collator of segmask's own batches: generation's and ``segmask train``'s (its Trainer's
``data_collator``; ``with_segment_ids=False`` for the causal policy without packing, so that the model runs
its own causal path). TRL's is :class:`segmask.integrations.trl.MASSFTCollator`. Every tensor is ``[B, L]``
(long). Padding is ``padding_side="right"`` for training and ``"left"`` for generation; padded positions
have ``attention_mask`` 0, ``segment_ids`` -1 and ``labels`` -100.
``position_ids`` count the real tokens of a row from 0 (padding gets 1, as ``generate`` does), so a left
padded row sees the same positions as the record alone.

With ``pack=True`` records are placed first-fit, in order, into rows of at most ``max_length`` tokens;
``document_ids`` (0, 1, ... per row; -1 on padding) keep the records apart in the mask and
``position_ids`` restart at 0 in each record. Two records ``[0, 0, -1]`` and ``[0, -1]`` in one row::

    document_ids  0 0 0 1 1          kv 0 1 2 3 4
    segment_ids   0 0 -1 0 -1     q 0  ■ ■ ⬚ ⬚ ⬚
    position_ids  0 1 2 0 1         1  ■ ■ ⬚ ⬚ ⬚
                                    2  ■ ■ ■ ⬚ ⬚
                                    3  ⬚ ⬚ ⬚ ■ ⬚
                                    4  ⬚ ⬚ ⬚ ■ ■
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from segmask import guard
from segmask.segments import IGNORE_INDEX, Encoded

Feature = Encoded | Mapping[str, Sequence[int]]


def as_encoded(feature: Feature, index: int = 0) -> Encoded:
    """An :class:`Encoded` from itself or a mapping with ``input_ids``, ``segment_ids`` and ``labels``."""
    if isinstance(feature, Encoded):
        return feature
    if not isinstance(feature, Mapping):
        raise ValueError(f"record {index}: expected an Encoded or a dict, got {type(feature).__name__}")
    missing = [key for key in ("input_ids", "segment_ids", "labels") if key not in feature]
    if missing:
        raise ValueError(f"record {index}: missing {', '.join(missing)}")
    try:
        return Encoded(
            input_ids=[int(t) for t in feature["input_ids"]],
            segment_ids=[int(s) for s in feature["segment_ids"]],
            labels=[int(y) for y in feature["labels"]],
        )
    except ValueError as error:
        raise ValueError(f"record {index}: {error}") from None


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit packing: for each row, the indices of the records placed in it (in order)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index, length in enumerate(lengths):
        if length > max_length:
            raise ValueError(f"record {index} has {length} tokens, more than max_length={max_length}")
        row = next((r for r, space in enumerate(free) if space >= length), None)
        if row is None:
            rows.append([])
            free.append(max_length)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= length
    return rows


def pad_token_id(tokenizer, fallback: int | None = 0) -> int:
    """The tokenizer's padding id, else its EOS id (padding is masked, so any id does), else ``fallback``
    (``None``: a ``ValueError``)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    if fallback is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; pass pad_token_id")
    return fallback


@dataclass(frozen=True)
class Collator:
    """Pad (or pack) a list of :class:`Encoded` (or dicts with their fields) into ``[B, L]`` tensors.

    ``pad_token_id`` defaults to the tokenizer's pad token, else its EOS. ``max_length`` is the row length
    when packing; without packing a longer record is a ``ValueError`` (cut records with
    :func:`segmask.overflow.apply_cutoff` first, never here). ``pad_to_multiple_of`` rounds ``L`` up.
    ``with_segment_ids=False`` leaves ``segment_ids`` out of an unpacked batch (a causal run).
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    padding_side: Literal["left", "right"] = "right"
    pack: bool = False
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    with_segment_ids: bool = True

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            if self.tokenizer is None:
                raise ValueError("Collator needs a pad_token_id or a tokenizer")
            object.__setattr__(self, "pad_token_id", pad_token_id(self.tokenizer, fallback=None))
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.pack and self.max_length is None:
            raise ValueError("pack=True needs max_length (the length of a packed row)")
        for name in ("max_length", "pad_to_multiple_of"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def rows(self, records: Sequence[Encoded]) -> list[list[int]]:
        """Which records go into which row: one record per row, or first-fit packing."""
        lengths = [len(record) for record in records]
        if self.pack:
            return pack_rows(lengths, self.max_length)  # type: ignore[arg-type]
        for index, length in enumerate(lengths):
            if self.max_length is not None and length > self.max_length:
                raise ValueError(
                    f"record {index} has {length} tokens, more than max_length={self.max_length}"
                )
        return [[index] for index in range(len(records))]

    def __call__(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        """``input_ids, attention_mask, segment_ids, position_ids, labels`` (and ``document_ids`` when
        packing), each ``[B, L]`` long."""
        if len(features) == 0:
            raise ValueError("cannot collate an empty batch")
        records = [as_encoded(feature, index) for index, feature in enumerate(features)]
        for index, record in enumerate(records):
            if len(record) == 0:
                raise ValueError(f"record {index} has no tokens")
        rows = self.rows(records)
        width = max(sum(len(records[i]) for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fills = {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "segment_ids": -1,
            "position_ids": 1,
            "labels": IGNORE_INDEX,
            "document_ids": -1,
        }
        batch = {key: torch.full((len(rows), width), fill, dtype=torch.long) for key, fill in fills.items()}
        for r, row in enumerate(rows):
            values: dict[str, list[int]] = {key: [] for key in fills}
            for document, index in enumerate(row):
                record = records[index]
                values["input_ids"] += record.input_ids
                values["attention_mask"] += [1] * len(record)
                values["segment_ids"] += record.segment_ids
                values["position_ids"] += list(range(len(record)))
                # a document's first token would be predicted from the previous document: never a label
                values["labels"] += [IGNORE_INDEX, *record.labels[1:]] if document else record.labels
                values["document_ids"] += [document] * len(record)
            length = len(values["input_ids"])
            span = slice(width - length, width) if self.padding_side == "left" else slice(0, length)
            for key, value in values.items():
                batch[key][r, span] = torch.tensor(value, dtype=torch.long)
        if not self.pack:
            del batch["document_ids"]
        if self.pack or bool((batch["segment_ids"] >= 0).any()):
            guard.install()  # a model that was not enabled now raises instead of ignoring these ids
        if not (self.with_segment_ids or self.pack):
            del batch["segment_ids"]
        return batch
