"""Training data for ``segmask train``: read records and encode them under a mask policy.

Each record is recognised by its keys, so one run may mix kinds::

    LLM-Adapters JSON   a JSON list of {"instruction", "input", "output", "answer"}  -> encode_instruction
    chat JSONL          one {"messages": [{"role", "content"}, ...]} per line         -> encode_chat
    datasets            a folder written by ``Dataset.save_to_disk`` (or a folder / .parquet / .csv /
                        .arrow file that ``datasets.load_dataset`` reads) holding either kind of record

Example::

    records = read_records(["../shared/data/commonsense/boolq_train.json"])
    train, held_out = split_records(records, eval_size=120, seed=42)
    dataset = encode_records(tokenizer, train, policy="mas", cutoff_len=256)

The loss falls only on causal tokens: :func:`check_causal_loss` refuses every example whose labels touch a
bidirectional token (or whose segments could leak a later token into a supervised prediction). Batches (padded
or packed) are :class:`segmask.collate.Collator`'s.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from segmask import segments
from segmask.files import read_json
from segmask.overflow import Overflow, apply_cutoff_all
from segmask.segments import IGNORE_INDEX

logger = logging.getLogger(__name__)

Record = dict[str, Any]
RecordKind = Literal["instruction", "chat"]
TABULAR_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
TEMPLATE_NAMES = {"instruction": "alpaca", "chat": "chat_template"}


# ---- reading -------------------------------------------------------------------------------------


def expand_paths(patterns: Sequence[str | Path]) -> list[Path]:
    """Files and folders named by ``patterns`` (glob patterns allowed), in the order given.

    Raises a ``ValueError`` for a path that does not exist or a pattern that matches nothing.
    """
    if not patterns:
        raise ValueError("no training data given (data: [] / --data)")
    paths: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        if glob.has_magic(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise ValueError(f"data pattern {text!r} matches no file")
            paths.extend(Path(m) for m in matches)
        elif Path(text).exists():
            paths.append(Path(text))
        else:
            raise ValueError(f"data file not found: {text}")
    return paths


def record_kind(record: Any) -> RecordKind | None:
    """``"instruction"`` or ``"chat"`` for a well-formed record, ``None`` otherwise."""
    if not isinstance(record, dict):
        return None
    if record.get("messages") is not None:  # datasets fills a missing column with None
        messages = record["messages"]
        valid = (
            isinstance(messages, list)
            and len(messages) > 0
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        return "chat" if valid else None
    fields = ("instruction", "output")
    if all(isinstance(record.get(key), str) for key in fields) and isinstance(record.get("input") or "", str):
        return "instruction"
    return None


def read_file(path: Path) -> list[Record]:
    """All records of one data file or folder; a ``ValueError`` names the file and record that is malformed."""
    path = Path(path)
    if path.is_dir():
        records = _read_datasets_folder(path)
    elif path.suffix == ".json":
        records = _read_json(path)
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path)
    elif path.suffix in TABULAR_SUFFIXES:
        records = _read_with_datasets(TABULAR_SUFFIXES[path.suffix], str(path))
    else:
        raise ValueError(
            f"{path}: unknown data format (expected .json, .jsonl, .parquet, .csv, .arrow or a folder)"
        )
    if not records:
        raise ValueError(f"{path}: no records")
    for index, record in enumerate(records):
        if record_kind(record) is None:
            raise ValueError(
                f"{path}: record {index} is neither an instruction record with string 'instruction', 'input', "
                f"'output' nor a chat record {{'messages': [{{'role', 'content'}}, ...]}}: {_preview(record)}"
            )
    return records


def read_records(paths: Sequence[Path]) -> list[Record]:
    """The records of all ``paths`` concatenated in order (files are not interleaved here; see split_records)."""
    records: list[Record] = []
    for path in paths:
        records.extend(read_file(path))
    return records


def _read_json(path: Path) -> list[Record]:
    data = read_json(path, "records")
    if isinstance(data, dict) and "messages" in data:
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
    return records


# `datasets` is imported where used: it takes most of a second to import and only some inputs need it


def _read_datasets_folder(path: Path) -> list[Record]:
    import datasets

    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{path}: dataset has splits {list(loaded)} but no 'train' split")
            loaded = loaded["train"]
        return loaded.to_list()
    return _read_with_datasets(str(path), None)


def _read_with_datasets(builder: str, data_files: str | None) -> list[Record]:
    import datasets

    try:
        loaded = datasets.load_dataset(builder, data_files=data_files, split="train")
    except Exception as error:  # datasets raises many types for unreadable input
        raise ValueError(
            f"{data_files or builder}: cannot be read by datasets ({type(error).__name__}: {error})"
        ) from None
    return loaded.to_list()


def _preview(record: Any, limit: int = 120) -> str:
    text = json.dumps(record, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def fingerprint(records: Iterable[Record]) -> str:
    """``sha256:<hex>`` of the records' canonical JSON, in file order (independent of seed and policy)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def split_records(
    records: Sequence[Record], eval_size: int, seed: int, max_records: int | None = None
) -> tuple[list[Record], list[Record]]:
    """Shuffle with ``seed`` (mixing all files), hold out ``eval_size`` records, keep at most ``max_records``.

    The same records and seed always give the same split and order.
    """
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    if eval_size >= len(shuffled):
        raise ValueError(f"eval_size {eval_size} leaves no training records (only {len(shuffled)} records)")
    held_out, train = shuffled[:eval_size], shuffled[eval_size:]
    if max_records is not None:
        train = train[:max_records]
    return train, held_out


def template_name(records: Iterable[Record], template: str = "alpaca") -> str:
    """The prompt template(s) the records use: ``template`` (the instruction template of LLM-Adapters
    records: ``alpaca`` or ``paper``), ``chat_template``, or both joined by ``+``."""
    names = {"instruction": template, "chat": TEMPLATE_NAMES["chat"]}
    return "+".join(sorted({names[record_kind(record)] for record in records}))


# ---- encoding ------------------------------------------------------------------------------------


def encode_record(
    tokenizer,
    record: Record,
    policy: str,
    train_on_inputs: bool = False,
    causal_sink: bool | None = None,
    template: str = "alpaca",
):
    """One record as a :class:`segmask.segments.Encoded` (no length limit), or ``None`` if nothing is supervised.

    ``train_on_inputs`` (causal policy only: ``Encoded`` refuses labels on segment tokens) puts the loss
    on the prompt too, as LLM-Adapters does by default. ``causal_sink``: token 0 causal under ``mas`` and
    ``prefix`` (:func:`segmask.policies.sink_on`: ``None`` is the policy's default, on under ``mas``). ``template``: the instruction template of an
    LLM-Adapters record (:mod:`segmask.templates`; ``paper`` gives the official training text).
    """
    if record_kind(record) == "chat":
        encoded = segments.encode_chat(tokenizer, record["messages"], policy=policy, causal_sink=causal_sink)
    else:
        encoded = segments.encode_instruction(
            tokenizer, record, policy=policy, include_answer=True, causal_sink=causal_sink, template=template
        )
    if train_on_inputs:
        encoded = segments.Encoded(
            encoded.input_ids, encoded.segment_ids, list(encoded.input_ids), encoded.prompt_turns
        )
    if all(label == IGNORE_INDEX for label in encoded.labels[1:]):
        return None
    return encoded


def check_causal_loss(
    segment_ids: Sequence[int], labels: Sequence[int], document_ids: Sequence[int] | None = None
) -> None:
    """Raise a ``ValueError`` unless every supervised token is causal and no supervised prediction can see ahead.

    Token ``i`` is supervised when ``labels[i] != -100``; it is predicted from position ``i - 1``. That
    position must not see token ``i`` or anything later, which holds when ``segment_ids[i] == -1`` and every
    bidirectional segment is one contiguous run (per document): a segment that resumed after ``i`` would let
    its earlier tokens see tokens written after the answer started.
    """
    if len(segment_ids) != len(labels):
        raise ValueError(f"segment_ids has {len(segment_ids)} tokens but labels has {len(labels)}")
    documents = document_ids if document_ids is not None else [0] * len(segment_ids)
    for position, (segment, label) in enumerate(zip(segment_ids, labels)):
        if label != IGNORE_INDEX and segment >= 0:
            raise ValueError(
                f"loss on a bidirectional token (position {position}, segment {segment}): labels must be -100 on "
                "every prompt-segment token; use the causal policy to train on inputs"
            )
    closed: set[tuple[int, int]] = set()
    previous: tuple[int, int] | None = None
    for segment, document in zip(segment_ids, documents):
        key = (document, segment)
        if previous is not None and key != previous and previous[1] >= 0:
            closed.add(previous)
        if segment >= 0 and key in closed:
            raise ValueError(
                f"segment {segment} is not contiguous: a bidirectional segment that resumes after other tokens "
                "would let earlier tokens see later ones"
            )
        previous = key


def encode_records(
    tokenizer,
    records: Sequence[Record],
    policy: str,
    cutoff_len: int,
    overflow: Overflow = "skip",
    train_on_inputs: bool = False,
    causal_sink: bool | None = None,
    template: str = "alpaca",
):
    """Encode and check every record: a ``datasets.Dataset`` with ``input_ids``, ``segment_ids``, ``labels``
    and ``length``, one row per record (packing happens per batch, in :class:`segmask.collate.Collator`).

    Records longer than ``cutoff_len`` follow ``overflow`` (``skip``, ``truncate``, ``error``: see
    :func:`segmask.overflow.apply_cutoff_all`); answers are never cut. Records without a supervised token
    are dropped; none left is a ``ValueError``. ``causal_sink`` and ``template`` as in :func:`encode_record`.
    """
    import datasets

    encoded = [
        e
        for record in records
        if (e := encode_record(tokenizer, record, policy, train_on_inputs, causal_sink, template)) is not None
    ]
    if not encoded:
        raise ValueError("no record has a supervised answer token")
    kept, report = apply_cutoff_all(encoded, cutoff_len, overflow)
    if report.over:
        logger.warning("%s; overflow=%s", report, overflow)
    if not kept:
        raise ValueError(f"no record fits cutoff_len={cutoff_len} ({report})")
    examples = [{"input_ids": e.input_ids, "segment_ids": e.segment_ids, "labels": e.labels} for e in kept]
    for example in examples:
        check_causal_loss(example["segment_ids"], example["labels"])
        example["length"] = len(example["input_ids"])
    return datasets.Dataset.from_list(examples)


def template_length(tokenizer, kinds: Iterable[RecordKind], policy: str, template: str = "alpaca") -> int:
    """Tokens of the shortest possible example: the instruction template with empty fields, or a chat
    template with one-character user and assistant turns. A cutoff must leave room beyond it."""
    lengths = [0]
    for kind in set(kinds):
        if kind == "instruction":
            empty = {"instruction": "", "input": "", "output": ""}
            lengths.append(
                len(segments.encode_instruction(tokenizer, empty, policy=policy, template=template))
            )
        else:
            turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "."}]
            lengths.append(len(segments.encode_chat(tokenizer, turns, policy=policy)))
    return max(lengths)
