"""Collator: padded and packed batches whose MAS masks equal each record's mask alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segmask.collate import Collator, pack_rows, pad_token_id
from segmask.masks import dense_mask
from segmask.segments import IGNORE_INDEX, Encoded, encode_chat, encode_instruction

CHATML = (Path(__file__).parent / "fixtures" / "chat_templates" / "chatml_smollm2.jinja").read_text(
    encoding="utf-8"
)
PAD = 0


@pytest.fixture(scope="module")
def records(stories_path) -> list[Encoded]:
    """Real encodings of different lengths: chats (stories260K tokenizer, ChatML) and an instruction."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    chats = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
        [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Tell me a story about a cat."},
            {"role": "assistant", "content": "Once upon a time, a cat sat."},
        ],
        [{"role": "user", "content": "Why?"}],
    ]
    encoded = [
        encode_chat(tokenizer, chats[0], chat_template=CHATML),
        encode_chat(tokenizer, chats[1], chat_template=CHATML),
    ]
    encoded.append(encode_chat(tokenizer, chats[2], add_generation_prompt=True, chat_template=CHATML))
    encoded.append(
        encode_instruction(tokenizer, {"instruction": "Is ice cold?", "input": "", "output": "true"})
    )
    return encoded


def single(record: Encoded) -> torch.Tensor:
    """The record's mask alone: ``[L, L]`` bool."""
    return dense_mask(torch.tensor([record.segment_ids]))[0, 0]


def test_right_padding(records):
    batch = Collator(pad_token_id=PAD)(records)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "position_ids", "segment_ids"]
    width = max(len(r) for r in records)
    assert all(t.shape == (len(records), width) and t.dtype == torch.long for t in batch.values())
    masks = dense_mask(batch["segment_ids"], batch["attention_mask"])
    for b, record in enumerate(records):
        n = len(record)
        assert batch["input_ids"][b].tolist() == record.input_ids + [PAD] * (width - n)
        assert batch["segment_ids"][b].tolist() == record.segment_ids + [-1] * (width - n)
        assert batch["labels"][b].tolist() == record.labels + [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        assert batch["position_ids"][b, :n].tolist() == list(range(n))
        assert torch.equal(masks[b, 0, :n, :n], single(record))
        assert not masks[b, 0, :, n:].any()  # nobody attends to padding


def test_left_padding_for_generation(records):
    batch = Collator(pad_token_id=PAD, padding_side="left")(records)
    width = batch["input_ids"].shape[1]
    masks = dense_mask(batch["segment_ids"], batch["attention_mask"])
    for b, record in enumerate(records):
        n, pad = len(record), width - len(record)
        assert batch["input_ids"][b].tolist() == [PAD] * pad + record.input_ids
        assert batch["attention_mask"][b].tolist() == [0] * pad + [1] * n
        # positions as transformers' generate numbers them: real tokens from 0, padding 1
        assert batch["position_ids"][b].tolist() == [1] * pad + list(range(n))
        assert torch.equal(masks[b, 0, pad:, pad:], single(record))
        assert not masks[b, 0, :, :pad].any()


def test_packing(records):
    lengths = [len(r) for r in records]
    max_length = max(lengths) + min(lengths)
    batch = Collator(pad_token_id=PAD, pack=True, max_length=max_length)(records)
    rows = pack_rows(lengths, max_length)
    assert sorted(i for row in rows for i in row) == list(range(len(records)))
    assert any(len(row) > 1 for row in rows) and len(rows) == batch["input_ids"].shape[0]
    assert batch["input_ids"].shape[1] == max(sum(lengths[i] for i in row) for row in rows)
    masks = dense_mask(batch["segment_ids"], batch["attention_mask"], batch["document_ids"])
    for r, row in enumerate(rows):
        start = 0
        for document, index in enumerate(row):
            record, end = records[index], start + lengths[index]
            assert batch["input_ids"][r, start:end].tolist() == record.input_ids
            assert batch["document_ids"][r, start:end].tolist() == [document] * len(record)
            assert batch["position_ids"][r, start:end].tolist() == list(range(len(record)))
            assert batch["labels"][r, start:end].tolist() == [IGNORE_INDEX] + record.labels[1:]
            block = masks[r, 0, start:end]
            assert torch.equal(block[:, start:end], single(record))
            assert not block[:, :start].any() and not block[:, end:].any()  # documents never see each other
            start = end
        assert (
            batch["document_ids"][r, start:].eq(-1).all() and batch["attention_mask"][r, start:].eq(0).all()
        )


def test_features_as_dicts_and_tokenizer_pad_id(records):
    """Trainer hands over dict rows; the pad id comes from the tokenizer (pad, else EOS)."""

    class Tokenizer:
        pad_token_id = None
        eos_token_id = 2

    rows = [
        {"input_ids": r.input_ids, "segment_ids": r.segment_ids, "labels": r.labels, "length": len(r)}
        for r in records
    ]
    from_dicts = Collator(Tokenizer(), pad_to_multiple_of=8)(rows)
    from_records = Collator(pad_token_id=2, pad_to_multiple_of=8)(records)
    assert from_dicts.keys() == from_records.keys()
    assert all(torch.equal(from_dicts[k], from_records[k]) for k in from_dicts)
    assert from_dicts["input_ids"].shape[1] % 8 == 0 and from_dicts["input_ids"][0, -1] == 2


def test_pad_token_id_falls_back_to_eos_then_to_the_fallback():
    class Tokenizer:
        pad_token_id = None
        eos_token_id = None

    tokenizer = Tokenizer()
    assert pad_token_id(tokenizer) == 0 and pad_token_id(tokenizer, fallback=7) == 7
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        Collator(tokenizer)
    tokenizer.eos_token_id = 2
    assert pad_token_id(tokenizer, fallback=None) == 2
    tokenizer.pad_token_id = 3
    assert pad_token_id(tokenizer) == 3


def test_bad_input(records):
    with pytest.raises(ValueError, match="empty batch"):
        Collator(pad_token_id=PAD)([])
    with pytest.raises(ValueError, match="record 1: missing segment_ids, labels"):
        Collator(pad_token_id=PAD)([records[0], {"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="record 0: token 1 is labelled but lies in bidirectional segment 0"):
        Collator(pad_token_id=PAD)([{"input_ids": [1, 2], "segment_ids": [0, 0], "labels": [-100, 2]}])
    with pytest.raises(ValueError, match="record 1 has .* tokens, more than max_length=8"):
        Collator(pad_token_id=PAD, max_length=8)([Encoded([1], [0], [-100]), records[0]])
    with pytest.raises(ValueError, match="pack=True needs max_length"):
        Collator(pad_token_id=PAD, pack=True)
    with pytest.raises(ValueError, match="padding_side"):
        Collator(pad_token_id=PAD, padding_side="middle")
    with pytest.raises(ValueError, match="needs a pad_token_id or a tokenizer"):
        Collator()


@st.composite
def encodings(draw) -> Encoded:
    """A random valid encoding: prompt segments in order, then causal tokens, some labelled."""
    segments = []
    for segment in range(draw(st.integers(0, 3))):
        segments += [segment] * draw(st.integers(1, 4))
    segments += [-1] * draw(st.integers(0 if segments else 1, 5))
    labelled = draw(st.lists(st.booleans(), min_size=len(segments), max_size=len(segments)))
    ids = [draw(st.integers(1, 99)) for _ in segments]
    labels = [t if y and s == -1 else IGNORE_INDEX for t, s, y in zip(ids, segments, labelled)]
    return Encoded(ids, segments, labels)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.lists(encodings(), min_size=1, max_size=5),
    side=st.sampled_from(["left", "right"]),
    pack=st.booleans(),
)
def test_batched_masks_equal_masks_alone(batch, side, pack):
    max_length = max(len(e) for e in batch) + 4
    out = Collator(pad_token_id=PAD, padding_side=side, pack=pack, max_length=max_length)(batch)
    masks = dense_mask(out["segment_ids"], out["attention_mask"], out.get("document_ids"))
    rows = pack_rows([len(e) for e in batch], max_length) if pack else [[i] for i in range(len(batch))]
    for r, row in enumerate(rows):
        used = sum(len(batch[i]) for i in row)
        start = out["input_ids"].shape[1] - used if side == "left" else 0
        covered = torch.zeros_like(masks[r, 0])
        for index in row:
            end = start + len(batch[index])
            assert torch.equal(masks[r, 0, start:end, start:end], single(batch[index]))
            covered[start:end, start:end] = True
            start = end
        real = out["attention_mask"][r].bool()
        assert not (masks[r, 0] & ~covered)[real].any()  # real tokens see nothing across records or padding
