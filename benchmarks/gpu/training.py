"""Training on the device: one LoRA step of a 1B-shape model (Llama-3.2-1B's config, random weights) under
``mas``, through ``segmask train``'s code path (:func:`segmask.training.train`) and through TRL's
:class:`segmask.integrations.trl.MASSFTTrainer`, in bf16 mixed precision as a GPU run trains.

Routes, each the same first step on the same four conversations (one batch):
    reference   "eager" in float32, no autocast: what the others are measured against
    causal      the reference under the causal policy (segmask train only): the mask's own effect on the
                loss, which the checks must resolve
    fast        attn_implementation "sdpa", which ``segmask.enable`` turns into the fast path, with the fast
                kernel (:func:`common.fast_kernel`: cuda-flash) made the device's default
    dense       "eager" in bf16: the dense route, the yardstick of rounding
    flex        "flex_attention" with a BlockMask (segmask train on the device only: no flex backward on CPU)
The first step's loss does not depend on the LoRA initialisation (B starts at 0), so every route of both
trainers sees the base model's loss on the batch; its gradient norm does (A is random), so it is compared
within a trainer (same seed). fast and flex are exact when their distance to the reference is at most twice
the dense route's plus a floor (:func:`common.within`). A route that raises is a FAILED check with its error.
"""

from __future__ import annotations

import json
import random
import traceback
from pathlib import Path

import torch
from common import LLAMA_1B, LLAMA_TINY, STORIES_CHAT_TEMPLATE, Run, default_kernel, fast_kernel, within

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
WORDS = (
    "the cat dog girl boy sun park ball tree red big little happy sad ran saw played with a an and then "
    "she he they was were is to in on under friend mom dad home school day night"
).split()


def conversations(rng: random.Random, count: int, words: int) -> list[list[dict]]:
    """Multi-turn conversations of about ``words`` words each: a system turn, then user / assistant turns."""

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    rows = []
    for _ in range(count):
        messages = [{"role": "system", "content": text(12)}]
        while sum(len(m["content"].split()) for m in messages) < words:
            messages.append({"role": "user", "content": text(rng.randint(10, words // 4))})
            messages.append({"role": "assistant", "content": text(rng.randint(5, words // 6))})
        rows.append(messages)
    return rows


def save_model(run: Run) -> Path:
    """The 1B-shape model with random weights (bf16) and stories260K's tokenizer with a chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    folder = run.work / "llama-1b-shape"
    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(**{**(LLAMA_TINY if run.dry else LLAMA_1B), "bos_token_id": 1, "eos_token_id": 2})
    torch.manual_seed(0)
    with torch.device(run.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(run.stories)
    tokenizer.chat_template = STORIES_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    del model
    run.free()
    return folder


def first_step():
    """A TrainerCallback keeping the first logged loss and gradient norm."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        def __init__(self):
            self.logs: dict[str, float] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and not self.logs:
                self.logs = {"loss": float(logs["loss"]), "grad_norm": float(logs.get("grad_norm", "nan"))}

    return FirstStep()


def segmask_train(
    run: Run, folder: Path, data: Path, cutoff: int, implementation: str, precision: str, mask: str = "mas"
):
    from segmask.train_config import TrainConfig
    from segmask.training import train

    callback = first_step()
    config = TrainConfig(
        model=str(folder),
        data=(str(data),),
        output=str(run.work / f"train-{implementation}-{precision}-{mask}"),
        policy=mask,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules=TARGETS,
        batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=1e-4,
        warmup_steps=0,
        logging_steps=1,
        save_steps=100,
        precision=precision,
        cutoff_len=cutoff,
        attn_implementation=implementation,
        seed=42,
    )
    train(config, callbacks=[callback])
    return callback.logs


def trl_train(
    run: Run, folder: Path, rows: list, cutoff: int, implementation: str, precision: str, mask: str = "mas"
):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from segmask.integrations.trl import MASSFTTrainer

    callback = first_step()
    trainer = MASSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=implementation
        ),
        args=SFTConfig(
            output_dir=str(run.work / f"trl-{implementation}-{precision}-{mask}"),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            max_steps=1,
            learning_rate=1e-4,
            lr_scheduler_type="linear",
            warmup_steps=0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=precision == "bf16",
            fp16=False,
            use_cpu=not run.cuda,
            gradient_checkpointing=False,
            max_length=cutoff,
            seed=42,
            dataloader_num_workers=0,
        ),
        peft_config=LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM"
        ),
        train_dataset=Dataset.from_list([{"messages": m} for m in rows]),
        processing_class=AutoTokenizer.from_pretrained(folder),
        policy=mask,
    )
    trainer.add_callback(callback)
    trainer.train()
    return callback.logs


# route: (attn_implementation, precision, mask policy); "reference" first: the others are measured against it
ROUTES = {
    "reference": ("eager", "fp32", "mas"),
    "causal": ("eager", "fp32", "causal"),
    "fast": ("sdpa", "bf16", "mas"),
    "dense": ("eager", "bf16", "mas"),
    "flex": ("flex_attention", "bf16", "mas"),
}
# in order of need, so that a budget cut drops what matters least: the checked routes and their yardsticks,
# then the mask's own effect (one trainer shows it), then flex (compiled anew in each trainer: one of them)
ORDER = (
    ("segmask-train", "reference"),
    ("segmask-train", "fast"),
    ("segmask-train", "dense"),
    ("trl", "reference"),
    ("trl", "fast"),
    ("trl", "dense"),
    ("segmask-train", "causal"),
    ("segmask-train", "flex"),
)
CHECKED = ("fast", "flex")
"""Routes checked against the reference; "dense" is the yardstick, "causal" the mask's own effect."""


def compare(run: Run, trainer: str, results: dict[str, dict | str]) -> None:
    """One check per route against the reference, by :func:`common.within` with the dense route's distance."""
    reference, dense = results.get("reference"), results.get("dense")
    if not isinstance(reference, dict) or not isinstance(dense, dict):
        run.check(f"training {trainer}", False, f"reference: {reference}; dense: {dense}")
        return
    # a floor of rounding's order (bf16 moved this loss by about 1e-5 of itself on CPU), far below a mask's
    # effect, which the "causal" route shows where it ran
    floors = {"loss": 2e-5 * abs(reference["loss"]), "grad_norm": 2e-3 * abs(reference["grad_norm"])}
    causal = results.get("causal")
    if isinstance(causal, dict):
        run.note(
            f"{trainer}: the mask's effect on this loss (causal policy against mas, float32) is "
            f"{abs(causal['loss'] - reference['loss']):.2e}; the checks' floor is {floors['loss']:.2e}"
        )
    for route in CHECKED:
        if route not in results:
            continue
        logs, name = results[route], f"training {trainer} {route} bf16"
        if not isinstance(logs, dict):
            run.check(name, False, f"raised {logs}")
            continue
        ok = all(
            within(abs(logs[key] - reference[key]), abs(dense[key] - reference[key]), floors[key])
            for key in floors
        )
        run.check(
            name,
            ok,
            f"loss {logs['loss']:.6f}, grad norm {logs['grad_norm']:.6f} (reference float32 {reference['loss']:.6f}, "
            f"{reference['grad_norm']:.6f}; dense bf16 {dense['loss']:.6f}, {dense['grad_norm']:.6f})",
        )


def main(run: Run) -> None:
    cutoff = 256 if run.dry else 1024
    rows = conversations(random.Random(0), 4, 60 if run.dry else 300)
    folder = save_model(run)
    data = run.work / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    run.note(
        f"model {folder} ({'tiny' if run.dry else 'Llama-3.2-1B shape'}), 4 conversations, cutoff {cutoff}"
    )
    kernel = fast_kernel(run.device, torch.bfloat16)
    trainers = {"segmask-train": (segmask_train, data), "trl": (trl_train, rows)}
    results: dict[str, dict[str, dict | str]] = {trainer: {} for trainer in trainers}
    for trainer, route in ORDER:
        implementation, precision, mask = ROUTES[route]
        if route == "flex" and not run.cuda:
            run.skip(f"training {trainer} flex", "FlexAttention has no backward on CPU")
            continue
        if not run.has_time(f"training {trainer} {route}", 10):
            continue
        train_fn, source = trainers[trainer]
        try:
            with default_kernel(kernel, run.device):
                results[trainer][route] = train_fn(
                    run, folder, source, cutoff, implementation, precision, mask
                )
        except Exception as error:  # noqa: BLE001 - a route that raises is a finding, the others go on
            traceback.print_exc()
            results[trainer][route] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        run.note(f"{trainer} {route} ({implementation}, {precision}, {mask}): {results[trainer][route]}")
        run.free()
    for trainer, routes in results.items():
        compare(run, trainer, routes)
    run.record("training", results)
    ours, theirs = (results[t].get("reference") for t in ("segmask-train", "trl"))
    if isinstance(ours, dict) and isinstance(theirs, dict):
        gap = abs(ours["loss"] - theirs["loss"])
        run.check(
            "training trl = segmask-train (float32 reference)",
            gap <= 1e-4 * abs(ours["loss"]),
            f"first-step loss {theirs['loss']:.6f} and {ours['loss']:.6f}",
        )
