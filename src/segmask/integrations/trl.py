"""MAS inside TRL's ``SFTTrainer``: conversations become segment ids, TRL keeps its collator and packing.

    from trl import SFTConfig
    from segmask.integrations.trl import MASSFTTrainer

    trainer = MASSFTTrainer(
        model=model,                       # any causal LM; segmask.enable is applied (idempotent)
        args=SFTConfig(output_dir="out", packing=True, max_length=512),
        train_dataset=dataset,             # {"messages": [...]} rows, or conversational prompt/completion
        processing_class=tokenizer,        # with a chat template
        policy="mas",
    )
    trainer.train()

What it adds to ``SFTTrainer``, and nothing else:

    dataset     each conversation through :func:`segmask.encode_chat`: ``input_ids`` (the chat template's own
                tokens), ``segment_ids`` and ``labels`` on assistant content and end-of-turn only (under
                ``mas`` a labelled token is always causal); TRL sees a tokenized, labelled dataset and only
                truncates, packs and shuffles it
    packing     TRL's ``pack_dataset`` (``bfd``, ``bfd_split``) packs ``segment_ids`` with the tokens; its
                ``seq_lengths`` become ``document_ids``, so the mask stays block-diagonal and exact
                (``wrapped`` cuts conversations anywhere and is refused)
    collator    :class:`MASSFTCollator`: TRL's ``DataCollatorForLanguageModeling`` (padding or padding-free)
                plus ``segment_ids`` (-1 on padding) and ``document_ids`` (-1 on padding) laid out the same way

``SFTConfig.assistant_only_loss`` is not needed (the labels are assistant-only already). A
conversation longer than ``max_length`` (packed or not) follows ``overflow``
(:func:`segmask.overflow.apply_cutoff_all`: ``skip``, ``truncate``, ``error``); answers are never cut.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from trl import SFTTrainer
from trl.data_utils import get_dataset_column_names, pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad

from segmask import segments
from segmask.data import check_causal_loss
from segmask.hook import enable
from segmask.overflow import Overflow, apply_cutoff_all
from segmask.parallel import check_sequence_sharding
from segmask.policies import MaskPolicy, check_policy
from segmask.segments import IGNORE_INDEX, Encoded

logger = logging.getLogger(__name__)

COLUMNS = ("input_ids", "segment_ids", "labels")
#: the flash / varlen kernels' inputs from TRL's padding-free collator; MAS runs no flash kernel (refused by
#: segmask.enable), so they are dropped rather than sent to attention functions that ignore them
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def example_messages(example: dict[str, Any]) -> tuple[list[dict], segments.TrainOn | None]:
    """The conversation of one TRL row, and which assistant turns it trains (``None``: the caller's choice).

    ``{"messages": [...]}`` (language modeling) or a conversational ``{"prompt": [...], "completion": [one
    assistant message]}`` (only the completion is trained)."""
    if example.get("messages") is not None:
        return list(example["messages"]), None
    prompt, completion = example.get("prompt"), example.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        if (
            len(completion) != 1
            or not isinstance(completion[0], dict)
            or completion[0].get("role") != "assistant"
        ):
            raise ValueError(
                "a prompt/completion row must have exactly one assistant message as its completion"
            )
        return [*prompt, *completion], "last"
    raise ValueError(
        "MASSFTTrainer needs conversational rows: {'messages': [...]} or {'prompt': [...], 'completion': [...]} "
        f"(got columns {sorted(example)})"
    )


def encode_dataset(
    dataset,
    tokenizer,
    policy: MaskPolicy = "mas",
    max_length: int | None = None,
    overflow: Overflow = "skip",
    train_on: segments.TrainOn = "all",
    causal_sink: bool | None = None,
):
    """A ``datasets.Dataset`` of conversations -> one with ``input_ids``, ``segment_ids``, ``labels``.

    Each row goes through :func:`segmask.encode_chat`; rows longer than ``max_length`` follow ``overflow``;
    rows with no supervised token are dropped (none left: a ``ValueError``)."""
    import datasets

    policy = check_policy(policy)
    encoded: list[Encoded] = []
    for example in dataset:
        messages, own_train_on = example_messages(example)
        record = segments.encode_chat(
            tokenizer, messages, policy=policy, train_on=own_train_on or train_on, causal_sink=causal_sink
        )
        if any(label != IGNORE_INDEX for label in record.labels[1:]):
            encoded.append(record)
    if max_length is not None and encoded:
        encoded, report = apply_cutoff_all(encoded, max_length, overflow)
        if report.over:
            logger.warning("%s; overflow=%s", report, overflow)
    if not encoded:
        raise ValueError(f"no conversation has a supervised assistant token within max_length={max_length}")
    rows = {name: [getattr(e, name) for e in encoded] for name in COLUMNS}
    return datasets.Dataset.from_dict(rows)


@dataclass
class MASSFTCollator(DataCollatorForLanguageModeling):
    """:class:`MASSFTTrainer`'s collator: TRL's plus ``segment_ids`` and ``document_ids``, laid out as its
    ``input_ids`` (segmask's own batches are :class:`segmask.collate.Collator`'s).

    Rows need ``segment_ids`` next to ``input_ids`` and ``labels`` (and ``seq_lengths`` when packed).
    ``document_ids`` number the documents of each row (0, 1, ...; a padding-free batch is one row, so its
    examples' documents are numbered on) and are sent only when some row holds more than one. Padding gets
    segment and document -1. Two packed documents ``[0 0 -1]`` and ``[0 -1]``::

        input_ids     a b c d e           kv 0 1 2 3 4
        segment_ids   0 0 -1 0 -1      q 0  ■ ■ ⬚ ⬚ ⬚
        document_ids  0 0 0 1 1          2  ■ ■ ■ ⬚ ⬚
        position_ids  0 1 2 0 1          3  ⬚ ⬚ ⬚ ■ ⬚

    Every supervised token must be causal (:func:`segmask.data.check_causal_loss`, per document).
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        for index, example in enumerate(examples):
            if "segment_ids" not in example:
                raise ValueError(f"example {index} has no segment_ids: encode it with encode_dataset first")
            if len(example["segment_ids"]) != len(example["input_ids"]):
                raise ValueError(
                    f"example {index}: {len(example['segment_ids'])} segment ids for "
                    f"{len(example['input_ids'])} tokens (truncated without its segment ids?)"
                )
        batch = super().torch_call(examples)
        for key in VARLEN_KEYS:
            batch.pop(key, None)
        segment_rows, document_rows, offset = [], [], 0
        for example in examples:
            lengths = list(example.get("seq_lengths") or [len(example["input_ids"])])
            documents = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            segment_rows.append(torch.as_tensor(example["segment_ids"], dtype=torch.long))
            document_rows.append(documents + (offset if self.padding_free else 0))
            offset += len(lengths)
            labels = example.get("labels", example["input_ids"])
            check_causal_loss(example["segment_ids"], labels, documents.tolist())
        if self.padding_free:
            segment_rows, document_rows = [torch.cat(segment_rows)], [torch.cat(document_rows)]
        options = dict(padding_value=-1, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
        batch["segment_ids"] = pad(segment_rows, **options)
        if any(int(row.max()) > 0 for row in document_rows):
            batch["document_ids"] = pad(document_rows, **options)
        if batch["segment_ids"].shape != batch["input_ids"].shape:  # TRL changed its layout
            raise ValueError(
                f"segment_ids {tuple(batch['segment_ids'].shape)} do not match input_ids "
                f"{tuple(batch['input_ids'].shape)}"
            )
        return batch


class MASSFTTrainer(SFTTrainer):
    """``SFTTrainer`` that trains under a mask policy: see the module docstring.

    ``policy``, ``train_on`` (``all`` or ``last`` assistant turn), ``causal_sink`` and ``overflow`` are
    those of :func:`segmask.encode_chat` / :func:`encode_dataset`; everything else is ``SFTTrainer``'s.
    The model is :func:`segmask.enable`\\ d after TRL has set it up (LoRA from ``peft_config`` included).
    """

    def __init__(
        self,
        *args: Any,
        policy: MaskPolicy = "mas",
        train_on: segments.TrainOn = "all",
        causal_sink: bool | None = None,
        overflow: Overflow = "skip",
        **kwargs: Any,
    ):
        self.policy = check_policy(policy)
        self.train_on, self.causal_sink, self.overflow = train_on, causal_sink, overflow
        if kwargs.get("data_collator") is not None:
            raise ValueError(
                "MASSFTTrainer builds its own collator (MASSFTCollator); pass data_collator=None"
            )
        if kwargs.get("formatting_func") is not None:
            raise ValueError("MASSFTTrainer reads conversations, not formatted text; drop formatting_func")
        check_sequence_sharding()  # before TRL builds anything
        super().__init__(*args, **kwargs)
        check_sequence_sharding(self.accelerator.parallelism_config)  # e.g. from an accelerate config file
        enable(self.model)
        self.data_collator = MASSFTCollator(
            pad_token_id=self._tokenizer.pad_token_id,
            padding_free=self.padding_free,
            pad_to_multiple_of=self.args.pad_to_multiple_of,
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "segment_ids" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "segment_ids"]

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if packing and args.packing_strategy == "wrapped":
            raise ValueError(
                "packing_strategy='wrapped' cuts conversations at any token and keeps no document boundaries, "
                "so segments would straddle rows; use packing_strategy='bfd' (or 'bfd_split')"
            )
        if "segment_ids" not in get_dataset_column_names(dataset):
            # cut here, by the overflow policy, so that neither TRL's truncation nor bfd ever cuts an answer
            dataset = encode_dataset(
                dataset,
                self._tokenizer,
                self.policy,
                args.max_length,
                self.overflow,
                self.train_on,
                self.causal_sink,
            )
        # tokenized and labelled: TRL only truncates (a no-op within max_length) and shuffles here
        dataset = super()._prepare_dataset(dataset, processing_class, args, False, None, dataset_name)
        if not packing:
            return dataset
        if args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")
        packed = pack_dataset(dataset.select_columns(list(COLUMNS)), args.max_length, args.packing_strategy)
        return packed.shuffle(seed=args.seed) if args.shuffle_dataset else packed
