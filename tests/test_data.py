"""`segmask.data`: reading LLM-Adapters JSON, chat JSONL and datasets folders, seeded splits, encoding
with loss only on causal tokens, packing with document ids, and the Trainer collator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import segmask
from segmask import data, segments
from segmask.collate import Collator

RECORDS = [
    {"instruction": "What did Lily see?", "input": "", "output": "Lily saw a cat.", "answer": "cat"},
    {"instruction": "Who ran?", "input": "Tom ran to the park.", "output": "Tom ran.", "answer": "Tom"},
    {
        "instruction": "Is the sky blue?",
        "input": "",
        "output": "the correct answer is true",
        "answer": "true",
    },
]
CHAT = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Red."},
        ]
    },
]


@pytest.fixture(scope="module")
def tokenizer(stories_path):
    return AutoTokenizer.from_pretrained(stories_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_json_jsonl_datasets_folder_and_parquet_read_the_same_records(tmp_path):
    import datasets

    as_json = write(tmp_path / "a.json", json.dumps(RECORDS))
    as_jsonl = write(tmp_path / "chat.jsonl", "\n".join(json.dumps(r) for r in CHAT) + "\n\n")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "split"))
    datasets.Dataset.from_list(RECORDS).to_parquet(str(tmp_path / "r.parquet"))
    for path in (as_json, tmp_path / "saved", tmp_path / "split", tmp_path / "r.parquet"):
        assert data.read_file(path) == RECORDS, path
    assert data.read_file(as_jsonl) == CHAT
    # globs expand in order; files are concatenated in the order given
    paths = data.expand_paths([str(tmp_path / "*.json"), str(as_jsonl)])
    assert paths == [as_json, as_jsonl]
    assert data.read_records(paths) == RECORDS + CHAT
    assert data.template_name(RECORDS + CHAT) == "alpaca+chat_template"


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.json", '[{"instruction": "x", ', r"bad\.json: not valid JSON"),
        ("obj.json", '{"instruction": "x"}', r"obj\.json: expected a JSON list of records, got a JSON dict"),
        ("empty.json", "[]", r"empty\.json: no records"),
        (
            "noout.json",
            '[{"instruction": "x", "output": "y"}, {"instruction": "x"}]',
            r"noout\.json: record 1 is neither",
        ),
        (
            "types.json",
            '[{"instruction": "x", "input": 3, "output": "y"}]',
            r"types\.json: record 0 is neither",
        ),
        ("bad.jsonl", '{"messages": []}\n{"messages": [', r"bad\.jsonl:2: not valid JSON"),
        ("role.jsonl", '{"messages": [{"role": "user", "content": 5}]}', r"role\.jsonl: record 0 is neither"),
        ("data.txt", "hello", r"data\.txt: unknown data format"),
    ],
)
def test_malformed_data_file_names_file_and_record(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        data.read_file(write(tmp_path / name, text))


def test_missing_data_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="data file not found: .*nope.json"):
        data.expand_paths([str(tmp_path / "nope.json")])
    with pytest.raises(ValueError, match="matches no file"):
        data.expand_paths([str(tmp_path / "*.json")])
    with pytest.raises(ValueError, match="no training data"):
        data.expand_paths([])


def test_split_is_seeded_disjoint_and_mixes_files():
    records = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(40)]
    train, held_out = data.split_records(records, eval_size=5, seed=1)
    again = data.split_records(records, eval_size=5, seed=1)
    other = data.split_records(records, eval_size=5, seed=2)
    assert (train, held_out) == again and (train, held_out) != other
    assert len(held_out) == 5 and sorted(train + held_out, key=lambda r: int(r["output"])) == records
    assert train != records[5:]  # shuffled, so files given one after another are mixed
    limited, _ = data.split_records(records, eval_size=5, seed=1, max_records=7)
    assert limited == train[:7]
    with pytest.raises(ValueError, match="eval_size 40 leaves no training records"):
        data.split_records(records, eval_size=40, seed=1)


def test_fingerprint_is_stable_and_sensitive_to_content_and_order():
    base = data.fingerprint(RECORDS)
    assert base == data.fingerprint(json.loads(json.dumps(RECORDS))) and base.startswith("sha256:")
    changed = [dict(RECORDS[0], output="Lily saw a dog."), *RECORDS[1:]]
    assert data.fingerprint(changed) != base
    assert data.fingerprint(RECORDS[::-1]) != base


def test_check_causal_loss_literal_layouts():
    data.check_causal_loss([0, 0, 1, -1, -1], [-100, -100, -100, 7, 8])
    data.check_causal_loss([0, 0, -1, 0, -1], [-100, -100, -100, -100, 9], document_ids=[0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"loss on a bidirectional token \(position 1, segment 0\)"):
        data.check_causal_loss([0, 0, -1], [-100, 5, 6])
    # segment 0 resumes after the answer started: its early tokens would see the answer through it
    with pytest.raises(ValueError, match="segment 0 is not contiguous"):
        data.check_causal_loss([0, -1, -1, 0], [-100, -100, 4, -100])
    with pytest.raises(ValueError, match="segment_ids has 2 tokens but labels has 3"):
        data.check_causal_loss([0, -1], [-100, 1, 2])


@pytest.mark.parametrize("policy", ["causal", "mas", "prefix"])
def test_encoded_rows_are_segments_encoding_with_loss_only_on_causal_tokens(tokenizer, policy):
    dataset = data.encode_records(tokenizer, RECORDS, policy=policy, cutoff_len=256)
    assert dataset.column_names == ["input_ids", "segment_ids", "labels", "length"]
    for row, record in zip(dataset, RECORDS):
        expected = segments.encode_instruction(tokenizer, record, policy=policy)
        assert row["input_ids"] == expected.input_ids
        assert row["segment_ids"] == expected.segment_ids
        assert row["labels"] == expected.labels
        assert row["length"] == len(expected.input_ids)
        supervised = [s for s, y in zip(row["segment_ids"], row["labels"]) if y != -100]
        assert supervised and all(s == -1 for s in supervised)
        answer = [y for y in row["labels"] if y != -100]
        assert tokenizer.decode(answer[:-1]) == record["output"] and answer[-1] == tokenizer.eos_token_id
    if policy != "causal":
        assert any(s >= 0 for s in dataset[0]["segment_ids"])


def test_overflow_skips_truncates_or_refuses_long_records(tokenizer):
    long = {"instruction": "one two three " * 40, "input": "", "output": "yes"}
    lengths = [len(segments.encode_instruction(tokenizer, r)) for r in RECORDS]
    cutoff = max(lengths)
    kept = data.encode_records(tokenizer, [*RECORDS, long], policy="mas", cutoff_len=cutoff, overflow="skip")
    assert kept["length"] == lengths
    with pytest.raises(ValueError, match=f"1 of 4 records exceed cutoff {cutoff}"):
        data.encode_records(tokenizer, [*RECORDS, long], policy="mas", cutoff_len=cutoff, overflow="error")
    cut = data.encode_records(tokenizer, [long], policy="mas", cutoff_len=cutoff, overflow="truncate")
    assert (
        cut[0]["length"] == cutoff
        and [y for y in cut[0]["labels"] if y != -100][-1] == tokenizer.eos_token_id
    )


def test_train_on_inputs_is_causal_only(tokenizer):
    causal = data.encode_record(tokenizer, RECORDS[0], "causal", train_on_inputs=True)
    assert causal.labels == causal.input_ids
    with pytest.raises(ValueError, match="labelled but lies in bidirectional segment"):
        data.encode_record(tokenizer, RECORDS[0], "mas", train_on_inputs=True)


def test_collator_pads_right_and_drops_segment_ids_for_the_causal_path(tokenizer):
    dataset = data.encode_records(tokenizer, RECORDS, policy="mas", cutoff_len=256)
    rows = [dataset[i] for i in range(len(dataset))]
    batch = Collator(tokenizer)(rows)
    width = max(dataset["length"])
    assert set(batch) == {"input_ids", "attention_mask", "segment_ids", "position_ids", "labels"}
    for i, row in enumerate(rows):
        n = row["length"]
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["segment_ids"][i, :n].tolist() == row["segment_ids"]
        assert batch["labels"][i].tolist() == row["labels"] + [-100] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    causal = Collator(tokenizer, with_segment_ids=False)(rows)
    assert "segment_ids" not in causal and torch.equal(causal["input_ids"], batch["input_ids"])


def test_packed_batch_gives_the_loss_of_the_padded_batch(stories_path, tokenizer):
    """Packing only removes padding: document ids keep the records apart, so the answer loss is unchanged."""
    model = segmask.enable(AutoModelForCausalLM.from_pretrained(stories_path).eval())
    dataset = data.encode_records(tokenizer, RECORDS, policy="mas", cutoff_len=256)
    rows = [dataset[i] for i in range(len(dataset))]

    def summed_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = dict(batch)
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")

    padded = Collator(tokenizer)(rows)
    packed = Collator(tokenizer, pack=True, max_length=512)(rows)
    assert packed["input_ids"].shape == (1, sum(dataset["length"]))
    assert packed["document_ids"][0].unique().tolist() == [0, 1, 2]
    torch.testing.assert_close(summed_loss(packed), summed_loss(padded), rtol=1e-5, atol=1e-4)
    # without document ids the later records would see the earlier ones and the loss would change
    leaky = {k: v for k, v in packed.items() if k != "document_ids"}
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
    assert not torch.allclose(summed_loss(leaky), summed_loss(padded), rtol=1e-5, atol=1e-4)


def test_template_length_is_the_empty_example(tokenizer):
    empty = segments.encode_instruction(
        tokenizer, {"instruction": "", "input": "", "output": ""}, policy="mas"
    )
    assert data.template_length(tokenizer, ["instruction"], "mas") == len(empty) > 20
