"""`segmask.training`: bad setups refused before a step, falling losses under every policy on stories260K and a tiny Qwen2,
MAS changing the gradients, atomic checkpoints with an exact resume, and output folders that load with
their recorded policy."""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import STORIES_CHAT_TEMPLATE
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

from segmask import files, loading, train_output, training
from segmask.data import encode_records, fingerprint
from segmask.runs import read_run, resolve_settings
from segmask.train_config import TrainConfig
from segmask.train_metrics import read_metrics
from segmask.training import SegmaskTrainer, train

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """Short story questions the tiny models can fit in a few steps."""
    rng = random.Random(0)
    names, things = ["Lily", "Tom", "Sue", "Ben"], ["a ball", "a cat", "a red hat", "a big tree"]
    out = []
    for _ in range(24):
        name, thing = rng.choice(names), rng.choice(things)
        out.append(
            {
                "instruction": f"What did {name} see?",
                "input": "",
                "output": f"{name} saw {thing}.",
                "answer": thing,
            }
        )
    return out


@pytest.fixture(scope="module")
def data_file(records, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "stories.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def qwen_path(stories_path, tmp_path_factory) -> Path:
    """A tiny random Qwen2 (hidden 64, 2 layers) with stories260K's tokenizer and a ChatML template."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("qwen2")
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    tokenizer.chat_template = CHATML
    tokenizer.pad_token = tokenizer.unk_token  # else the folder's Qwen2 tokenizer class adds a 513th token
    tokenizer.save_pretrained(folder)
    return folder


def tiny(model: Path, data: Path, output: Path, **overrides) -> TrainConfig:
    """A config that trains the tiny models in well under a second per step."""
    values = dict(
        model=str(model), data=(str(data),), output=str(output), max_steps=8, batch_size=4,
        gradient_accumulation_steps=1, learning_rate=1e-2, warmup_steps=0, logging_steps=1, save_steps=100,
        lora_r=8, lora_alpha=16, cutoff_len=128,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def losses(output: Path, key: str = "loss") -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in read_metrics(output / train_output.METRICS_FILE) if key in row]


def test_lora_wrapping_keeps_peft_deprecation_quiet(stories_path, tmp_path):
    """peft reads a deprecated transformers attribute while wrapping; the user never sees that warning."""
    config = tiny(stories_path, tmp_path / "data.json", tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = training.build_model(config)
    assert hasattr(model, "peft_config")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


# ---- bad configurations fail before training ---------------------------------------------------


def test_bad_setups_fail_before_any_training(stories_path, data_file, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "x", "output": ')
    cases = [
        (dict(data=tmp_path / "nope.json"), "data file not found"),
        (dict(data=broken), r"broken\.json: not valid JSON"),
        (dict(cutoff_len=20), r"cutoff_len 20 is shorter than the prompt template \(\d+ tokens"),
        (dict(model=tmp_path / "no-model"), "no model at"),
        (dict(lora_target_modules=("w_in",)), "w_in"),
        (dict(attn_implementation="flex_attention", precision="fp16"), "fp16 needs a CUDA GPU"),
    ]
    for index, (overrides, message) in enumerate(cases):
        output = tmp_path / f"run{index}"
        model, data = overrides.pop("model", stories_path), overrides.pop("data", data_file)
        with pytest.raises(ValueError, match=message):
            train(tiny(model, data, output, **overrides))
        assert not list(output.glob("checkpoint-*")) and not (output / train_output.METRICS_FILE).exists()


def test_an_existing_run_is_never_overwritten_silently(stories_path, data_file, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "weights.safetensors").write_text("precious")
    with pytest.raises(ValueError, match="already holds a run; pass --resume .* or --overwrite"):
        train(tiny(stories_path, data_file, output))
    assert (output / "weights.safetensors").read_text() == "precious"


# ---- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["causal", "mas", "prefix"])
@pytest.mark.parametrize("model", ["stories260K", "qwen2"])
def test_a_few_steps_lower_the_loss(model, policy, stories_path, qwen_path, data_file, tmp_path):
    """LoRA on the pretrained stories260K; full fine-tuning on the random Qwen2 (LoRA alone moves it slowly)."""
    path, lora_r = (stories_path, 8) if model == "stories260K" else (qwen_path, 0)
    output = train(tiny(path, data_file, tmp_path / "run", policy=policy, max_steps=10, lora_r=lora_r))
    curve = [loss for _, loss in losses(output)]
    assert len(curve) == 10
    assert sum(curve[-3:]) / 3 < 0.7 * curve[0], curve
    info = json.loads((output / "segmask.json").read_text())
    assert info["policy"] == policy and info["adapter"] is (lora_r > 0)


def test_chat_jsonl_trains_with_the_chat_template(qwen_path, tmp_path):
    chats = tmp_path / "chat.jsonl"
    lines = [
        {"messages": [{"role": "system", "content": "Answer."}, {"role": "user", "content": f"{a} plus {b}?"},
                      {"role": "assistant", "content": str(a + b)}]}
        for a in range(4) for b in range(4)
    ]  # fmt: skip
    chats.write_text("\n".join(json.dumps(line) for line in lines))
    output = train(tiny(qwen_path, chats, tmp_path / "run", max_steps=6))
    curve = [loss for _, loss in losses(output)]
    assert curve[-1] < curve[0]
    assert json.loads((output / "segmask.json").read_text())["template"] == "chat_template"


def test_packing_trains_on_the_same_records_with_less_padding(stories_path, data_file, tmp_path):
    common = dict(
        max_steps=3, lora_dropout=0.0, cutoff_len=512
    )  # dropout masks would depend on the row shapes
    padded = train(tiny(stories_path, data_file, tmp_path / "padded", **common))
    packed = train(tiny(stories_path, data_file, tmp_path / "packed", packing=True, **common))
    # same records per step, the batch's loss is a mean over the same answer tokens
    for (_, a), (_, b) in zip(losses(padded), losses(packed)):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a))


def test_mas_changes_the_update_and_runs_are_deterministic(stories_path, data_file, tmp_path):
    """One optimiser step from the same start: MAS moves the weights differently from causal attention."""

    def adapter_after_one_step(policy: str, name: str) -> dict[str, torch.Tensor]:
        output = train(tiny(stories_path, data_file, tmp_path / name, policy=policy, max_steps=1))
        return load_file(output / "adapter_model.safetensors")

    causal, mas, mas_again = (
        adapter_after_one_step(p, n) for p, n in [("causal", "c"), ("mas", "m"), ("mas", "m2")]
    )
    assert all(torch.equal(mas[k], mas_again[k]) for k in mas)
    lora_b = [k for k in mas if "lora_B" in k]
    assert lora_b and any(not torch.allclose(mas[k], causal[k], atol=1e-7) for k in lora_b)


def test_kill_and_resume_reproduce_the_uninterrupted_loss_curve(
    stories_path, data_file, tmp_path, monkeypatch
):
    """A run killed while writing checkpoint-9 resumes from checkpoint-6 and draws the same curve.

    Length-grouped order, LoRA dropout and an epoch boundary (22 records, 6 per step) all have to line up.
    """
    settings = dict(
        max_steps=12, batch_size=3, gradient_accumulation_steps=2, save_steps=3, eval_size=2, eval_steps=5,
        warmup_steps=2, lora_dropout=0.1,
    )  # fmt: skip
    reference = train(tiny(stories_path, data_file, tmp_path / "reference", **settings))

    class Killed(Exception):
        pass

    save_rng_state = SegmaskTrainer._save_rng_state

    def killed_at_step_9(self, output_dir):
        if self.state.global_step == 9:
            raise Killed
        save_rng_state(self, output_dir)

    monkeypatch.setattr(SegmaskTrainer, "_save_rng_state", killed_at_step_9)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(tiny(stories_path, data_file, run, **settings))
    monkeypatch.undo()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9.tmp",
    ]
    assert train_output.last_checkpoint(run).name == "checkpoint-6"
    assert max(step for step, _ in losses(run)) == 9  # logged before the kill, logged again after resuming

    with pytest.raises(ValueError, match=r"different config \(learning_rate changed\)"):
        train(tiny(stories_path, data_file, run, resume=True, **{**settings, "learning_rate": 1e-3}))
    resumed = train(tiny(stories_path, data_file, run, resume=True, **settings))
    assert losses(resumed) == losses(reference) and len(losses(reference)) == 12
    assert losses(resumed, "eval_loss") == losses(reference, "eval_loss")
    final, expected = (
        load_file(resumed / "adapter_model.safetensors"),
        load_file(reference / "adapter_model.safetensors"),
    )
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert not list(run.glob("*.tmp"))


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_stopped_run_writes_no_final_output(stories_path, data_file, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(training.Interrupted, match="stopped at step 2; rerun with --resume"):
        train(tiny(stories_path, data_file, run, save_steps=2), callbacks=[StopAt(2)])
    assert not (run / "segmask.json").exists() and train_output.last_checkpoint(run).name == "checkpoint-2"


# ---- outputs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefix_run(stories_path, data_file, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("prefix") / "run"
    return train(
        tiny(stories_path, data_file, output, policy="prefix", eval_size=4, eval_steps=4, merge=True)
    )


def test_output_folder_records_the_run(prefix_run, stories_path, data_file, records):
    info = json.loads((prefix_run / "segmask.json").read_text())
    assert info["policy"] == "prefix" and info["template"] == "alpaca" and info["adapter"] is False
    assert info["causal_sink"] is False and resolve_settings(read_run(prefix_run)).causal_sink is False
    assert info["base_model"] == str(stories_path.resolve())
    assert info["data_fingerprint"] == fingerprint(records)
    assert info["train_config"]["policy"] == "prefix" and info["train_config"]["data"] == [str(data_file)]
    assert info["segmask_version"]
    adapter_info = json.loads((prefix_run / "adapter" / "segmask.json").read_text())
    assert adapter_info["adapter"] is True and adapter_info["policy"] == "prefix"
    for name in (
        "model.safetensors",
        "adapter/adapter_model.safetensors",
        "tokenizer.json",
        "loss_curve.png",
    ):
        assert (prefix_run / name).is_file(), name
    rows = read_metrics(prefix_run / train_output.METRICS_FILE)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]
    assert all(r["tokens_per_second"] > 0 for r in rows if "loss" in r)


def test_output_folders_load_with_their_recorded_policy(prefix_run, stories_path):
    merged, tokenizer, policy = loading.load_model(prefix_run)
    from_adapter, _, adapter_policy = loading.load_model(prefix_run / "adapter")
    assert policy == adapter_policy == "prefix"
    base = AutoModelForCausalLM.from_pretrained(stories_path)
    tokens = torch.tensor([tokenizer("Once upon a time")["input_ids"]])
    segment_ids = torch.tensor([[0] * (tokens.shape[1] - 1) + [-1]])
    with torch.no_grad():
        a = merged(tokens, segment_ids=segment_ids).logits
        b = from_adapter(tokens, segment_ids=segment_ids).logits
        assert not torch.allclose(a, base(tokens).logits, atol=1e-4)  # the fine-tuned weights, not the base
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_causal_sink_is_trained_recorded_and_given_back(stories_path, data_file, records, tmp_path):
    encoded = encode_records(loading.load_tokenizer(stories_path), records[:2], "mas", 128, causal_sink=True)
    assert [row[:3] for row in encoded["segment_ids"]] == [[-1, 0, 0]] * 2  # <s> causal, the system segment 0
    output = train(
        tiny(stories_path, data_file, tmp_path / "sink", policy="mas", causal_sink=True, max_steps=2)
    )
    info = json.loads((output / "segmask.json").read_text())
    assert info["causal_sink"] is True and info["train_config"]["causal_sink"] is True
    assert read_run(output).causal_sink is True
    assert resolve_settings(read_run(output)).causal_sink is True
    with pytest.warns(UserWarning, match="causal_sink=True"):
        assert resolve_settings(read_run(output), causal_sink=False).causal_sink is False
    _, _, policy = loading.load_model(output)
    assert policy == "mas"
    assert read_run(stories_path) is None  # not a run: the policy's default decides
    assert resolve_settings(None).causal_sink is None


def test_the_sink_default_is_resolved_per_mask_and_recorded(stories_path, data_file, tmp_path):
    """causal_sink None (the default) is the mask's default: on under mas, off under prefix and causal; the
    config holds the resolved value, so train_config.json and segmask.json record what was trained."""
    for mask, sink in [("mas", True), ("prefix", False), ("causal", False)]:
        assert tiny(stories_path, data_file, tmp_path / mask, policy=mask).causal_sink is sink, mask
    assert tiny(stories_path, data_file, tmp_path / "paper", causal_sink=False).causal_sink is False
    assert (
        tiny(stories_path, data_file, tmp_path / "c", policy="causal", causal_sink=True).causal_sink is False
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {stories_path}\ndata: [{data_file}]\npolicy: mas\n")
    assert TrainConfig.from_yaml(recipe).causal_sink is True
    assert TrainConfig.from_yaml(recipe, policy="prefix").causal_sink is False


def test_a_run_saved_before_causal_sink_existed_resumes_without_it(stories_path, data_file, tmp_path):
    # such a run trained with the sink off: it resumes with causal_sink false ...
    config = tiny(stories_path, data_file, tmp_path / "run", causal_sink=False)
    saved = {k: v for k, v in config.to_dict().items() if k != "causal_sink"}
    train_output.check_same_run(config, saved, tmp_path)
    # ... and is refused with the mas default (on), which would train another mask
    with pytest.raises(ValueError, match="causal_sink changed"):
        train_output.check_same_run(tiny(stories_path, data_file, tmp_path / "run"), saved, tmp_path)


def test_full_fine_tuning_writes_full_safetensors_weights(stories_path, data_file, tmp_path):
    output = train(
        tiny(stories_path, data_file, tmp_path / "full", lora_r=0, learning_rate=3e-3, max_steps=6)
    )
    assert (output / "model.safetensors").is_file() and not (output / "adapter_model.safetensors").exists()
    assert json.loads((output / "segmask.json").read_text())["adapter"] is False
    curve = [loss for _, loss in losses(output)]
    assert curve[-1] < curve[0]
    model, _, policy = loading.load_model(output)
    assert policy == "mas" and sum(p.numel() for p in model.parameters()) == 260_032


# ---- resume and the output folder ---------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder): what "untouched" compares."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))
    }


def test_resuming_a_finished_run_changes_nothing(stories_path, data_file, tmp_path, caplog):
    """A finished run resumed is a no-op, byte for byte; one stopped while writing its final outputs gets
    them from its last checkpoint, without a step past max_steps."""
    run = tmp_path / "run"
    train(tiny(stories_path, data_file, run, max_steps=3))
    assert train_output.last_checkpoint(run).name == "checkpoint-3"
    before = snapshot(run)
    with caplog.at_level("INFO", logger="segmask.training"):
        assert train(tiny(stories_path, data_file, run, max_steps=3, resume=True)) == run
    assert snapshot(run) == before
    assert "already finished at step 3; nothing to do" in caplog.text

    adapter = load_file(run / "adapter_model.safetensors")
    (run / "segmask.json").unlink()  # stopped after the last checkpoint, before the final outputs
    (run / "adapter_model.safetensors").unlink()
    train(tiny(stories_path, data_file, run, max_steps=3, resume=True))
    final = load_file(run / "adapter_model.safetensors")
    assert all(torch.equal(final[k], adapter[k]) for k in adapter)
    assert [step for step, _ in losses(run)] == [1, 2, 3]
    assert json.loads((run / "segmask.json").read_text())["policy"] == "mas"


def test_resume_and_overwrite_refuse_a_folder_of_other_files(stories_path, data_file, tmp_path):
    """--resume (like --overwrite) never trains into, or deletes, a folder that is not a segmask run; a run
    whose metrics.jsonl holds other rows is refused before anything changes."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "adapter_config.json").write_text('{"mine": true}')
    (user / "metrics.jsonl").write_text('{"accuracy": 0.5}\n')
    before = snapshot(user)
    for flag in ("resume", "overwrite"):
        with pytest.raises(ValueError, match=f"not a segmask run folder .* refusing --{flag} into it"):
            train(tiny(stories_path, data_file, user, **{flag: True}))
        assert snapshot(user) == before

    run = tmp_path / "run"
    run.mkdir()
    config = tiny(stories_path, data_file, run, resume=True)
    (run / train_output.RUN_CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"accuracy": 0.5}\n')
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a segmask metrics row"):
        train(config)
    assert snapshot(run) == before


def test_overwrite_removes_the_runs_files_and_nothing_else(stories_path, data_file, tmp_path):
    """The probe: --overwrite emptied the folder, the user's notes with it. Now it removes what a run writes
    (run_files: weights, tokenizer, checkpoints, metrics, half-written temporaries) and keeps the rest."""
    run = tmp_path / "run"
    train(tiny(stories_path, data_file, run, max_steps=2, save_steps=1))
    (run / "NOTES.txt").write_text("precious")
    (run / "mine").mkdir()
    (run / "mine" / "eval.json").write_text("{}")
    (run / ".segmask.json.999.tmp").write_text("half")  # a killed write_json_atomic's
    train(tiny(stories_path, data_file, run, max_steps=1, overwrite=True, lora_r=0))
    assert (run / "NOTES.txt").read_text() == "precious" and (run / "mine" / "eval.json").read_text() == "{}"
    assert [step for step, _ in losses(run)] == [1] and [p.name for p in run.glob("checkpoint-*")] == [
        "checkpoint-1"
    ]
    assert not (run / "adapter_model.safetensors").exists() and (run / "model.safetensors").exists()
    assert not list(run.glob(".*.tmp")) and not (run / train_output.LOCK_FILE).exists()
    removed = {p.name for p in train_output.run_files(run)}
    assert {"checkpoint-1", "metrics.jsonl", "model.safetensors", "config.json", "tokenizer.json",
            "segmask.json", "train_config.json", "loss_curve.png"} <= removed  # fmt: skip
    assert not removed & {"NOTES.txt", "mine", "README.md"}


def test_inputs_inside_the_output_folder_are_refused(stories_path, data_file, tmp_path):
    """Data or a base model inside the output folder: --overwrite would delete it (a model.safetensors is a
    run file), a run would write over it. Refused before anything changes, with or without a flag."""
    run = tmp_path / "run"
    train(tiny(stories_path, data_file, run, max_steps=1))
    inside = run / "data.json"
    inside.write_bytes(data_file.read_bytes())
    base = run / "base"
    base.mkdir()
    for file in stories_path.iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    before = snapshot(run)
    output = re.escape(str(run))
    cases = [
        (
            stories_path,
            inside,
            {"overwrite": True},
            f"output {output} holds the input {re.escape(str(inside))}; keep",
        ),
        (
            base,
            data_file,
            {"overwrite": True},
            f"output {output} holds the input {re.escape(str(base))}; keep",
        ),
        (
            stories_path,
            inside,
            {"resume": True},
            f"output {output} holds the input {re.escape(str(inside))}; keep",
        ),
        (run, data_file, {"overwrite": True}, f"output {output} is also an input; refusing to overwrite it"),
    ]
    for model, data, flags, message in cases:
        with pytest.raises(ValueError, match=message):
            train(tiny(model, data, run, max_steps=1, **flags))
        assert snapshot(run) == before


class LockSeen(TrainerCallback):
    """Records the lock file's text at each step."""

    def __init__(self, output: Path):
        self.lock, self.seen = output / train_output.LOCK_FILE, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(self.lock.read_text() if self.lock.exists() else None)


class Crash(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def test_the_output_folder_is_locked_for_the_whole_run(stories_path, data_file, tmp_path):
    """The run holds .segmask.lock (its pid inside) at every step and releases it on every exit: the end,
    an interruption, an error. Another holder refuses the run before anything is written."""
    run = tmp_path / "run"
    seen = LockSeen(run)
    with pytest.raises(training.Interrupted):
        train(tiny(stories_path, data_file, run, max_steps=4, save_steps=2), callbacks=[seen, StopAt(2)])
    assert seen.seen == [f"{os.getpid()}\n"] * 2 and not seen.lock.exists()
    with pytest.raises(ValueError, match="cannot resume .* with a different config"):  # a refusal
        train(tiny(stories_path, data_file, run, max_steps=4, save_steps=2, resume=True, cutoff_len=200))
    assert not seen.lock.exists()
    with pytest.raises(RuntimeError, match="crash at step 3"):  # a crash mid-run
        train(
            tiny(stories_path, data_file, run, max_steps=4, save_steps=2, resume=True), callbacks=[Crash(3)]
        )
    assert not seen.lock.exists()
    before = snapshot(run)
    with files.exclusive_lock(seen.lock, "test"):
        with pytest.raises(
            ValueError, match=rf"output {re.escape(str(run))} is in use by another run \(process"
        ):
            train(tiny(stories_path, data_file, run, max_steps=4, save_steps=2, resume=True))
        assert snapshot(run) == {**before, train_output.LOCK_FILE: f"{os.getpid()}\n".encode()}
    seen.seen.clear()
    train(tiny(stories_path, data_file, run, max_steps=4, save_steps=2, resume=True), callbacks=[seen])
    assert seen.seen == [f"{os.getpid()}\n"] * 2 and not seen.lock.exists()  # steps 3 and 4


def test_chat_data_without_a_chat_template_names_the_flag(stories_path, tmp_path):
    """stories260K has no chat template: the error names --chat-template, and with one the run trains on
    the chats and saves the template with its tokenizer (merged weights' folder too)."""
    chats = tmp_path / "chat.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"{a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]}
             for a in range(4) for b in range(4)]  # fmt: skip
    chats.write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(ValueError, match="has no chat template; pass --chat-template FILE"):
        train(tiny(stories_path, chats, tmp_path / "none", max_steps=1))
    template = tmp_path / "chat.jinja"
    template.write_text(STORIES_CHAT_TEMPLATE)
    output = train(
        tiny(stories_path, chats, tmp_path / "run", max_steps=2, chat_template=str(template), merge=True)
    )
    for folder in (output, output / "adapter"):
        assert AutoTokenizer.from_pretrained(folder).chat_template == STORIES_CHAT_TEMPLATE, folder
    assert json.loads((output / "segmask.json").read_text())["train_config"]["chat_template"] == str(template)


def test_a_moved_run_resumes(stories_path, data_file, tmp_path):
    """The saved config is compared on what defines the run, not on where its folder lies."""
    first = tmp_path / "here" / "run"
    with pytest.raises(training.Interrupted):
        train(tiny(stories_path, data_file, first, max_steps=4, save_steps=2), callbacks=[StopAt(2)])
    moved = tmp_path / "there"
    first.rename(moved)
    train(tiny(stories_path, data_file, moved, max_steps=4, save_steps=2, resume=True))
    assert [step for step, _ in losses(moved)] == [1, 2, 3, 4]
    info = json.loads((moved / "segmask.json").read_text())
    assert info["train_config"]["output"] == str(moved)


def test_an_output_that_cannot_be_written_is_refused_before_anything(stories_path, data_file, tmp_path):
    """A file, or a folder below a file, is a ValueError naming the output, and nothing is written."""
    afile = tmp_path / "notes.txt"
    afile.write_text("precious")
    with pytest.raises(ValueError, match=r"output .*notes\.txt is a file, not a folder"):
        train(tiny(stories_path, data_file, afile))
    with pytest.raises(ValueError, match=r"cannot write to output .*notes\.txt/run: Not a directory"):
        train(tiny(stories_path, data_file, afile / "run"))
    assert afile.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("resume", [False, True])
def test_a_read_only_output_folder_is_refused(stories_path, data_file, tmp_path, resume):
    """chmod a-w; skipped where the user (root) writes to it anyway."""
    run = tmp_path / "run"
    run.mkdir()
    if resume:
        (run / train_output.RUN_CONFIG_FILE).write_text(
            json.dumps(tiny(stories_path, data_file, run).to_dict())
        )
    run.chmod(0o555)
    try:
        try:
            (run / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("this user writes to read-only folders (root)")
        before = snapshot(run)
        with pytest.raises(ValueError, match="cannot write to output .*run: Permission denied"):
            train(tiny(stories_path, data_file, run, resume=resume))
        assert snapshot(run) == before
    finally:
        run.chmod(0o755)


# ----------------------------------------------------------------- the paper's recipe: best model, template


class ForcedEvalLoss(TrainerCallback):
    """Replaces each eval loss by a given one (Trainer picks the best from the same dict)."""

    def __init__(self, by_step: dict[int, float]):
        self.by_step = by_step

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_loss"] = self.by_step[state.global_step]


def test_load_best_model_at_end_keeps_the_lowest_eval_loss(stories_path, data_file, tmp_path):
    """Eval losses 3, 1, 2 at steps 1-3: the final adapter is checkpoint-2's, which the
    atomic checkpoints keep findable (best_model_checkpoint points at the renamed folder)."""
    config = tiny(
        stories_path, data_file, tmp_path / "best", max_steps=3, eval_size=4, eval_steps=1, save_steps=1,
        load_best_model_at_end=True,
    )  # fmt: skip
    output = train(config, callbacks=[ForcedEvalLoss({1: 3.0, 2: 1.0, 3: 2.0})])
    final = load_file(output / "adapter_model.safetensors")
    for step, same in [(1, False), (2, True), (3, False)]:
        saved = load_file(output / f"checkpoint-{step}" / "adapter_model.safetensors")
        assert all(torch.equal(final[k], saved[k]) for k in final) is same, step
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(output / "checkpoint-2") and state["best_global_step"] == 2
    with pytest.raises(ValueError, match="load_best_model_at_end needs an eval split"):
        tiny(stories_path, data_file, tmp_path / "x", load_best_model_at_end=True)
    with pytest.raises(ValueError, match=r"save_steps \(3\) to be a multiple of eval_steps \(2\)"):
        tiny(
            stories_path,
            data_file,
            tmp_path / "x",
            eval_size=4,
            eval_steps=2,
            save_steps=3,
            load_best_model_at_end=True,
        )


def test_the_paper_template_is_trained_and_recorded(stories_path, data_file, records, tmp_path):
    tokenizer = loading.load_tokenizer(stories_path)
    [row] = encode_records(tokenizer, records[:1], "mas", 256, template="paper")["input_ids"]
    text = tokenizer.decode(row, skip_special_tokens=True)
    assert "request.  \n\n                ### Instruction:\n                What did" in text
    output = train(
        tiny(stories_path, data_file, tmp_path / "paper", template="paper", max_steps=1, cutoff_len=256)
    )
    info = json.loads((output / "segmask.json").read_text())
    assert info["template"] == "paper" and info["train_config"]["template"] == "paper"
    assert resolve_settings(read_run(output)).template == "paper"
    assert resolve_settings(read_run(stories_path)).template == "alpaca"
    with pytest.warns(UserWarning, match="trained with template 'paper'"):
        assert resolve_settings(read_run(output), template="alpaca").template == "alpaca"
    with pytest.raises(ValueError, match=r"^unknown template 'plain'; expected one of alpaca, paper$"):
        tiny(stories_path, data_file, tmp_path / "x", template="plain")
    # a run saved before the fields existed resumes with their defaults
    config = tiny(stories_path, data_file, tmp_path / "run")
    saved = {k: v for k, v in config.to_dict().items() if k not in ("template", "load_best_model_at_end")}
    train_output.check_same_run(config, saved, tmp_path)


@pytest.mark.parametrize("where", ["arguments", "accelerator"])
def test_context_parallelism_is_refused_before_anything_is_written(
    where, stories_path, data_file, tmp_path, monkeypatch
):
    """A ParallelismConfig with cp_size > 1 on the TrainingArguments or on the Trainer's accelerator (as an
    accelerate config file sets it) stops a MAS run before the output folder exists: context parallelism
    drops the mask and would train causally."""
    from accelerate.parallelism_config import ParallelismConfig

    real_arguments = training.training_arguments
    sharded = ParallelismConfig(cp_size=2)
    if where == "arguments":

        def arguments(*args, **kwargs):
            result = real_arguments(*args, **kwargs)
            result.parallelism_config = sharded
            return result

        monkeypatch.setattr(training, "training_arguments", arguments)
    else:  # set after the accelerator is built (building it with cp_size=2 needs a distributed launch)
        real_init = SegmaskTrainer.__init__

        class ShardedAccelerator:
            parallelism_config = sharded

            def __init__(self, accelerator):
                self.accelerator = accelerator

            def __getattr__(self, name):
                return getattr(self.accelerator, name)

        def init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            self.accelerator = ShardedAccelerator(self.accelerator)

        monkeypatch.setattr(SegmaskTrainer, "__init__", init)
    output = tmp_path / "run"
    with pytest.raises(ValueError, match="context parallelism"):
        train(tiny(stories_path, data_file, output, policy="mas", max_steps=1))
    assert not (output / "segmask.json").exists() and not list(output.glob("checkpoint-*"))
