"""Tiny random models that vLLM's CPU backend runs (head_dim 64), with stories260K's tokenizer and a chat
template from tests/fixtures, saved as model folders; and segmask's own greedy tokens for them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# vLLM in this process (no engine subprocess: the plugin is the installed entry point either way), with a
# small KV cache. Set before vllm is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from conftest import STORIES, require_shared  # noqa: E402

TEMPLATES = Path(__file__).resolve().parents[2] / "fixtures" / "chat_templates"
NEW_TOKENS = 16
# what the engine tests send: one turn; a system message and two turns; three turns of different length
CONVERSATIONS = [
    [{"role": "user", "content": "Once upon a time, Lily"}],
    [
        {"role": "system", "content": "Tell short stories."},
        {"role": "user", "content": "Tom had a big red ball"},
        {"role": "assistant", "content": "He threw it high."},
        {"role": "user", "content": "What did Tom do next?"},
    ],
    [
        {"role": "user", "content": "Sue saw a cat"},
        {"role": "assistant", "content": "The cat was soft."},
        {"role": "user", "content": "Then what?"},
        {"role": "assistant", "content": "It ran away to the park and played with a dog."},
        {"role": "user", "content": "Where did it go after the park and why was the dog so happy?"},
    ],
]
RAW_PROMPT = "Once upon a time, there was a little girl"


def build_model(folder: Path, architecture: str, template: str, seed: int = 0) -> Path:
    """A random 2-layer model (hidden 128, 2 query heads and 1 KV head of 64) of ``architecture`` with
    stories260K's tokenizer and the chat template ``template`` (a file in tests/fixtures/chat_templates)."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    configs = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}  # fmt: skip
    config_class, model_class = configs[architecture]
    config = config_class(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # large weights: sharp next-token choices that a changed mask changes
        for name, parameter in model.named_parameters():
            if parameter.ndim > 1:
                parameter.normal_(0, 0.4)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.fill_(4.0)  # Qwen3 normalises q and k: sharpen its attention too
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(require_shared(STORIES))
    tokenizer.chat_template = (TEMPLATES / template).read_text()
    tokenizer.save_pretrained(tokenizer_folder(folder))
    return folder


def tokenizer_folder(folder: Path) -> Path:
    """Where the tokenizer of a test model lies: the model folder for Llama; for Qwen a folder of its own,
    since AutoTokenizer gives a Qwen config a byte-level tokenizer class whatever the files say, and that
    class garbles a SentencePiece vocabulary's text (vLLM takes it through ``tokenizer=``)."""
    config = json.loads((folder / "config.json").read_text())
    return folder if config["model_type"] == "llama" else folder / "tokenizer"


def with_policy(source: Path, folder: Path, policy: str | None, causal_sink: bool | None = None) -> Path:
    """A copy of the model folder ``source`` whose segmask.json asks for ``policy`` (None: no segmask.json)."""
    shutil.copytree(source, folder)
    if policy is not None:
        run = {"policy": policy, "base_model": "random", "adapter": False}
        if causal_sink is not None:
            run["causal_sink"] = causal_sink
        (folder / "segmask.json").write_text(json.dumps(run))
    return folder


def segmask_tokens(folder: Path, prompts: list, policy: str | None = None) -> list[list[int]]:
    """Greedy new token ids from ``segmask.generate`` for each prompt: the folder's policy (or ``policy``)
    and the sink its segmask.json saved (else the policy's default), as ``segmask serve`` runs it."""
    from transformers import AutoTokenizer

    import segmask

    model, _, policy = segmask.load_model(folder, policy=policy)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(folder))
    run = folder / "segmask.json"
    sink = json.loads(run.read_text()).get("causal_sink", False) if run.is_file() else None
    return [
        segmask.generate(model, tokenizer, prompt, policy=policy, causal_sink=sink, max_new_tokens=NEW_TOKENS,
                         do_sample=False)[0].token_ids
        for prompt in prompts
    ]  # fmt: skip
