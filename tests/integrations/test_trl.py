"""MAS inside TRL's SFTTrainer on stories260K (with a chat template): literal labels and segment ids, the
first-step loss of `segmask train`, packed = unpacked, and a trained model that passes the leak check."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import SFTConfig  # noqa: E402

import segmask  # noqa: E402
from segmask.integrations.trl import MASSFTCollator, MASSFTTrainer, encode_dataset  # noqa: E402
from segmask.leaks import leak_check  # noqa: E402

NAMES = ("Lily", "Tom", "Sue", "Ben")
CONVERSATIONS = [
    [
        {"role": "system", "content": "Tell short stories."},
        {"role": "user", "content": f"What did {name} see?"},
        {"role": "assistant", "content": f"{name} saw a {thing}."},
    ]
    for name, thing in zip(NAMES, ("cat", "dog", "ball", "tree"))
]
CONVERSATIONS[3] += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Ben ran."}]


@pytest.fixture(scope="module")
def tokenizer(stories_chat):
    """The saved chat copy's tokenizer: the same one `segmask train` loads from that folder."""
    return AutoTokenizer.from_pretrained(stories_chat)


def model_of(stories_chat):
    return AutoModelForCausalLM.from_pretrained(stories_chat, dtype=torch.float32)


def config(tmp_path, **overrides) -> SFTConfig:
    values = dict(
        output_dir=str(tmp_path / "sft"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        max_length=256,
        seed=42,
        dataloader_num_workers=0,
    )
    return SFTConfig(**{**values, **overrides})


class FirstLoss(TrainerCallback):
    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def trainer_for(stories_chat, tokenizer, tmp_path, rows=None, policy="mas", **overrides) -> MASSFTTrainer:
    rows = rows if rows is not None else [{"messages": c} for c in CONVERSATIONS]
    return MASSFTTrainer(
        model=model_of(stories_chat),
        args=config(tmp_path, **overrides),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        policy=policy,
    )


def whole_batch(trainer) -> dict:
    """Every prepared row of the training set in one collated batch (order as prepared)."""
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


@torch.no_grad()
def batch_loss(trainer, batch) -> float:
    trainer.model.eval()
    return float(trainer.compute_loss(trainer.model, dict(batch)))


# ---- labels and segment ids -------------------------------------------------------------------------

HI_YO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
# "<|user|>\nHi</s>" " " "\n" | "<|assistant|>\n" "Yo</s>" " " "\n"  (stories260K, STORIES_CHAT_TEMPLATE)
HI_YO_IDS = [410, 504, 506, 425, 419, 285, 506, 505, 13, 440, 417, 2, 410, 13,
             504, 506, 412, 419, 419, 293, 413, 303, 413, 506, 505, 13, 452, 414, 2, 410, 13]  # fmt: skip
HI_YO_SEGMENTS = [-1] + [0] * 13 + [-1] * 17  # mas: token 0 (the BOS, the sink) causal by default
HI_YO_LABELS = [-100] * 26 + [452, 414, 2, 410, 13]  # "Yo</s>", the space and newline closing the turn


def test_encode_dataset_puts_the_loss_on_assistant_tokens_only(stories_path):
    from conftest import STORIES_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    tokenizer.chat_template = STORIES_CHAT_TEMPLATE
    row = encode_dataset(Dataset.from_list([{"messages": HI_YO}]), tokenizer, policy="mas")[0]
    assert row == {"input_ids": HI_YO_IDS, "segment_ids": HI_YO_SEGMENTS, "labels": HI_YO_LABELS}
    assert tokenizer.decode([t for t in row["labels"] if t != -100]) == "Yo</s> \n"
    assert row["input_ids"] == tokenizer.apply_chat_template(HI_YO, tokenize=True)["input_ids"]
    paper = encode_dataset(Dataset.from_list([{"messages": HI_YO}]), tokenizer, causal_sink=False)[0]
    assert paper["segment_ids"] == [0] * 14 + [-1] * 17  # the paper's mask: the BOS in segment 0

    # prompt/completion rows train the completion only; the causal policy keeps the labels
    pc = {"prompt": HI_YO[:1], "completion": HI_YO[1:]}
    assert encode_dataset(Dataset.from_list([pc]), tokenizer)[0] == row
    causal = encode_dataset(Dataset.from_list([{"messages": HI_YO}]), tokenizer, policy="causal")[0]
    assert causal["segment_ids"] == [-1] * 31 and causal["labels"] == HI_YO_LABELS


def test_the_collator_lays_out_segment_and_document_ids_like_trl(tokenizer):
    """Padded, and padding-free with packed seq_lengths: two documents [0 0 -1] and [0 -1] in one row."""
    first = {"input_ids": [5, 6, 7], "segment_ids": [0, 0, -1], "labels": [-100, -100, 7]}
    second = {"input_ids": [8, 9], "segment_ids": [0, -1], "labels": [-100, 9]}
    padded = MASSFTCollator(pad_token_id=2)([first, second])
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 2]]
    assert padded["segment_ids"].tolist() == [[0, 0, -1], [0, -1, -1]]
    assert padded["labels"].tolist() == [[-100, -100, 7], [-100, 9, -100]]
    assert "document_ids" not in padded  # one document per row: nothing to separate

    packed = {k: first[k] + second[k] for k in first} | {"seq_lengths": [3, 2]}
    flat = MASSFTCollator(pad_token_id=2, padding_free=True, pad_to_multiple_of=8)([packed])
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2, 2, 2]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    assert flat["segment_ids"].tolist() == [[0, 0, -1, 0, -1, -1, -1, -1]]
    assert flat["document_ids"].tolist() == [[0, 0, 0, 1, 1, -1, -1, -1]]
    assert flat["labels"].tolist() == [[-100, -100, 7, -100, 9, -100, -100, -100]]
    assert "cu_seq_lens_q" not in flat and "attention_mask" not in flat

    with pytest.raises(ValueError, match="loss on a bidirectional token"):
        MASSFTCollator(pad_token_id=2)([{**first, "labels": [5, -100, 7]}])
    with pytest.raises(ValueError, match="example 0: 2 segment ids for 3 tokens"):
        MASSFTCollator(pad_token_id=2)([{**first, "segment_ids": [0, -1]}])


def test_the_trainer_batch_has_literal_labels_and_segments(stories_chat, tokenizer, tmp_path):
    """The saved chat copy's tokenizer (the one `segmask train` loads) has no space token after </s>."""
    trainer = trainer_for(stories_chat, tokenizer, tmp_path, rows=[{"messages": HI_YO}])
    batch = whole_batch(trainer)
    ids = [t for i, t in enumerate(HI_YO_IDS) if i not in (12, 29)]
    assert ids == tokenizer.apply_chat_template(HI_YO, tokenize=True)["input_ids"]
    assert batch["input_ids"].tolist() == [ids]
    assert batch["labels"].tolist() == [[-100] * 25 + [452, 414, 2, 13]]  # "Yo</s>\n"
    assert batch["segment_ids"].tolist() == [[-1] + [0] * 12 + [-1] * 16]
    assert batch["attention_mask"].tolist() == [[1] * 29] and "document_ids" not in batch
    assert segmask.hook.is_enabled(trainer.model)


# ---- losses -----------------------------------------------------------------------------------------


def test_first_step_loss_equals_segmask_train(stories_chat, tokenizer, tmp_path):
    """Same records, model, batch (all 4), lr and schedule: TRL's fused loss = `segmask train`'s loss."""
    from segmask.train_config import TrainConfig
    from segmask.training import train

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    ours = FirstLoss()
    train(
        TrainConfig(
            model=str(stories_chat), data=(str(data),), output=str(tmp_path / "run"), policy="mas",
            lora_r=0, batch_size=4, gradient_accumulation_steps=1, max_steps=2, learning_rate=1e-2,
            warmup_steps=0, logging_steps=1, save_steps=100, precision="fp32", cutoff_len=256,
        ),
        callbacks=[ours],
    )  # fmt: skip
    trl_loss = FirstLoss()
    trainer = trainer_for(stories_chat, tokenizer, tmp_path, max_steps=2)
    trainer.add_callback(trl_loss)
    trainer.train()
    assert len(ours.losses) == len(trl_loss.losses) == 2
    assert trl_loss.losses[0] == pytest.approx(ours.losses[0], rel=1e-5, abs=1e-6)
    # the second step sees the same update (same optimiser, lr, clipping): equal up to float noise
    assert trl_loss.losses[1] == pytest.approx(ours.losses[1], rel=1e-3)
    assert trl_loss.losses[1] < trl_loss.losses[0]

    # the mask reaches the model: the causal policy on the same records scores the first batch differently
    causal = trainer_for(stories_chat, tokenizer, tmp_path / "c", policy="causal")
    mas = trainer_for(stories_chat, tokenizer, tmp_path / "m")
    assert abs(batch_loss(causal, whole_batch(causal)) - batch_loss(mas, whole_batch(mas))) > 1e-3
    assert batch_loss(mas, whole_batch(mas)) == pytest.approx(ours.losses[0], rel=1e-5)


def test_packed_and_unpacked_batches_give_the_same_loss(stories_chat, tokenizer, tmp_path):
    unpacked = trainer_for(stories_chat, tokenizer, tmp_path / "u")
    packed = trainer_for(
        stories_chat, tokenizer, tmp_path / "p", packing=True, max_length=512, per_device_train_batch_size=1
    )
    padding_free = trainer_for(stories_chat, tokenizer, tmp_path / "f", padding_free=True, max_length=None)

    assert len(packed.train_dataset) == 1  # bfd put all four conversations into one row of 512
    row = whole_batch(packed)
    assert row["input_ids"].shape[0] == 1 and "attention_mask" not in row
    assert sorted(set(row["document_ids"][0].tolist())) == [0, 1, 2, 3]
    assert row["segment_ids"].shape == row["input_ids"].shape

    reference = batch_loss(unpacked, whole_batch(unpacked))
    assert batch_loss(packed, row) == pytest.approx(reference, rel=1e-5)
    assert batch_loss(padding_free, whole_batch(padding_free)) == pytest.approx(reference, rel=1e-5)
    # without document ids the packed conversations would see each other: a different loss
    leaky = {k: v for k, v in row.items() if k != "document_ids"}
    assert abs(batch_loss(packed, leaky) - reference) > 1e-4


def test_packed_training_passes_the_leak_check(stories_chat, tokenizer, tmp_path):
    trainer = trainer_for(
        stories_chat, tokenizer, tmp_path, packing=True, per_device_train_batch_size=1, max_steps=3
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    losses = FirstLoss()
    trainer.add_callback(losses)
    trainer.train()
    assert len(losses.losses) == 3 and all(torch.isfinite(torch.tensor(losses.losses)))
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    for conversation in CONVERSATIONS[2:]:
        encoded = segmask.encode_chat(tokenizer, conversation, policy="mas")
        assert leak_check(trainer.model, encoded) <= 1e-4


def test_bad_configurations_are_refused_in_one_line(stories_chat, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="packing_strategy='wrapped' cuts conversations"):
        trainer_for(stories_chat, tokenizer, tmp_path, packing=True, packing_strategy="wrapped")
    with pytest.raises(ValueError, match="MASSFTTrainer needs conversational rows"):
        trainer_for(stories_chat, tokenizer, tmp_path, rows=[{"text": "Once upon a time"}])
    with pytest.raises(ValueError, match="builds its own collator"):
        MASSFTTrainer(
            model=model_of(stories_chat), args=config(tmp_path), data_collator=MASSFTCollator(pad_token_id=2),
            train_dataset=Dataset.from_list([{"messages": HI_YO}]), processing_class=tokenizer,
        )  # fmt: skip


def test_lora_from_peft_config_and_an_eval_set_train_under_mas(stories_chat, tokenizer, tmp_path):
    """The usual TRL setup: LoRA through ``peft_config`` and an ``eval_dataset``. The adapter trains (only
    LoRA weights move), the eval loss is the MAS loss of the eval conversations (a causal trainer's
    differs), and the trained PeftModel passes the leak check."""
    from peft import LoraConfig

    rows = [{"messages": c} for c in CONVERSATIONS]

    def lora_trainer(policy, folder):
        return MASSFTTrainer(
            model=model_of(stories_chat),
            args=config(tmp_path / folder, max_steps=2, eval_strategy="no"),
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(rows[2:]),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
            policy=policy,
        )

    trainer = lora_trainer("mas", "mas")
    assert type(trainer.model).__name__.startswith("Peft")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and all("lora_" in n for n in moved)
    evaluated = trainer.evaluate()["eval_loss"]
    eval_batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    assert set(eval_batch) >= {"segment_ids", "labels"}
    assert evaluated == pytest.approx(batch_loss(trainer, eval_batch), rel=1e-5)
    causal = lora_trainer("causal", "causal")
    assert abs(causal.evaluate()["eval_loss"] - lora_trainer("mas", "mas0").evaluate()["eval_loss"]) > 1e-4
    for conversation in CONVERSATIONS[2:]:
        assert leak_check(trainer.model, segmask.encode_chat(tokenizer, conversation, policy="mas")) <= 1e-4
