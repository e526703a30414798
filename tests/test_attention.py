"""`segmask.enable` on every model family and backend: exact when causal, consistent across backends under MAS,
exact with packed documents and a KV cache, and leak-free on the real pretrained stories260K."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import segmask
from segmask import attention, compat

pytestmark = pytest.mark.exactness

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **TINY),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, **TINY),
    "qwen3": lambda: transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **TINY),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, sliding_window=5, **TINY),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        **TINY,
    ),
    "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, **TINY),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    ),
}
BACKENDS = ("eager", "sdpa", "segmask", "flex_attention")  # segmask: the fast path enable() picks on sdpa
NO_FLEX = {"gpt2": "transformers has no flex_attention path for GPT-2"}

# a system segment, a user segment, then causal tokens; second row left-padded with a different layout
SEGMENTS = torch.tensor(
    [
        [0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1, -1],
        [-1, -1, 0, 0, 1, 1, 1, 1, 1, -1, -1, -1],
    ]
)
PADDING = torch.tensor([[1] * 12, [0, 0] + [1] * 10])


def tiny_model(family: str, backend: str) -> torch.nn.Module:
    if backend == "flex_attention" and family in NO_FLEX:
        pytest.skip(NO_FLEX[family])
    torch.manual_seed(0)
    load_as = "sdpa" if backend == "segmask" else backend
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation=load_as)
    model = segmask.enable(model.eval(), fast=backend == "segmask")
    assert model.config._attn_implementation == backend
    return model


@pytest.fixture(autouse=True)
def _static_flex_shapes():
    # torch 2.13's CPU inductor miscompiles flex_attention when it recompiles with dynamic shapes;
    # keep shapes static in tests (GPU flex is unaffected).
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield


def logits(model, **kwargs) -> torch.Tensor:
    torch.manual_seed(1)
    input_ids = torch.randint(1, 128, SEGMENTS.shape)
    with torch.no_grad():
        return model(input_ids, attention_mask=PADDING, **kwargs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_all_causal_equals_default_forward(family):
    for backend in BACKENDS:
        if backend == "flex_attention" and family in NO_FLEX:
            continue
        model = tiny_model(family, backend)
        default = logits(model)
        causal = logits(model, segment_ids=torch.full_like(SEGMENTS, -1))
        real = PADDING.bool()
        assert (default - causal)[real].abs().max() < 1e-6, backend


@pytest.mark.parametrize("family", FAMILIES)
def test_backends_agree_under_mas(family):
    results = {}
    for backend in BACKENDS:
        if backend == "flex_attention" and family in NO_FLEX:
            continue
        results[backend] = logits(tiny_model(family, backend), segment_ids=SEGMENTS)
    real = PADDING.bool()
    reference = results["sdpa"]
    for backend, value in results.items():
        assert torch.isfinite(value).all(), backend
        assert (value - reference)[real].abs().max() < 1e-5, backend
    # MAS is really on: prompt positions differ from causal
    causal = logits(tiny_model(family, "sdpa"))
    assert (reference - causal)[0, :7].abs().max() > 1e-4


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_packed_documents_equal_separate_rows(backend):
    model = tiny_model("llama", backend)
    torch.manual_seed(2)
    a, b = torch.randint(1, 128, (1, 7)), torch.randint(1, 128, (1, 5))
    seg_a, seg_b = torch.tensor([[0, 0, 1, 1, 1, -1, -1]]), torch.tensor([[0, 0, 0, -1, -1]])
    with torch.no_grad():
        alone_a = model(a, segment_ids=seg_a).logits
        alone_b = model(b, segment_ids=seg_b).logits
        packed = model(
            torch.cat([a, b], 1),
            segment_ids=torch.cat([seg_a, seg_b], 1),
            document_ids=torch.tensor([[0] * 7 + [1] * 5]),
            position_ids=torch.tensor([list(range(7)) + list(range(5))]),
        ).logits
    assert (packed[:, :7] - alone_a).abs().max() < 1e-5
    assert (packed[:, 7:] - alone_b).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["eager", "sdpa", "segmask"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_new_segment_against_kv_cache_equals_full_forward(family, backend):
    model = tiny_model(family, backend)
    torch.manual_seed(3)
    ids = torch.randint(1, 128, (1, 12))
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1, -1]])
    with torch.no_grad():
        full = model(ids, segment_ids=seg).logits
        first = model(ids[:, :7], segment_ids=seg[:, :7], use_cache=True)
        # the new tokens' segment ids only; cached tokens count as causal
        cache = compat.output_cache(first)
        second = model(ids[:, 7:], segment_ids=seg[:, 7:], **compat.cache_kwargs(model, cache)).logits
    assert (torch.cat([first.logits, second], 1) - full).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_kv_cache_found_under_the_deprecated_argument_name_too():
    """transformers >= 5.24 still accepts ``past_key_values``: the cache is found by type, not by name."""
    model = tiny_model("llama", "segmask")
    ids = torch.randint(1, 128, (1, 12))
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1, -1]])
    with torch.no_grad():
        full = model(ids, segment_ids=seg).logits
        first = model(ids[:, :7], segment_ids=seg[:, :7], use_cache=True)
        second = model(ids[:, 7:], segment_ids=seg[:, 7:], past_key_values=compat.output_cache(first)).logits
    assert (torch.cat([first.logits, second], 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["eager", "sdpa", "segmask"])
def test_a_mask_that_disagrees_with_the_cache_raises(backend):
    """Segment ids for more positions than cached + new tokens never run: the error names both lengths."""
    model = tiny_model("llama", backend)
    ids = torch.randint(1, 128, (1, 12))
    with torch.no_grad():
        first = model(ids[:, :7], segment_ids=torch.zeros(1, 7, dtype=torch.long), use_cache=True)
        cache = compat.output_cache(first)
        with pytest.raises(ValueError, match=r"expected \[1, 5\].*or \[1, 12\]"):
            model(
                ids[:, 7:],
                segment_ids=torch.zeros(1, 9, dtype=torch.long),
                **compat.cache_kwargs(model, cache),
            )


@pytest.mark.parametrize(
    "backend, new_tokens, error, message",
    [
        # the fast kernel checks its key count against the mask's
        ("segmask", 5, ValueError, r"built for 5 keys .* has 12 keys"),
        # one new token: a [1, 1, 1, 1] dense mask would broadcast over every key; the post-forward check refuses
        ("sdpa", 1, compat.TransformersChangedError, r"built for 0 cached \+ 1 new keys.*holds 8"),
        ("eager", 1, compat.TransformersChangedError, r"built for 0 cached \+ 1 new keys.*holds 8"),
    ],
)
def test_a_cache_the_hook_cannot_see_raises_instead_of_running_from_zero(
    monkeypatch, backend, new_tokens, error, message
):
    """If a release hides the cache from the pre-hook, the mask would assume no cached tokens: it raises."""
    model = tiny_model("llama", backend)
    ids = torch.randint(1, 128, (1, 7 + new_tokens))
    with torch.no_grad():
        first = model(ids[:, :7], segment_ids=torch.zeros(1, 7, dtype=torch.long), use_cache=True)
        cache = compat.output_cache(first)
        monkeypatch.setattr(compat, "find_cache", lambda arguments: None)
        with pytest.raises(error, match=message):
            model(
                ids[:, 7:], segment_ids=torch.full((1, new_tokens), -1), **compat.cache_kwargs(model, cache)
            )


def test_works_through_peft_and_backward():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", "sdpa")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    segmask.enable(peft_model)  # idempotent, finds the decoder through peft
    ids = torch.randint(1, 128, (1, 12))
    out_mas = peft_model(ids, segment_ids=SEGMENTS[:1], labels=ids)
    out_causal = peft_model(ids, labels=ids)
    assert abs(out_mas.loss.item() - out_causal.loss.item()) > 1e-6
    out_mas.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_refuses_flash_attention_and_bad_ids():
    model = tiny_model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="drops custom masks"):
        model(torch.ones(1, 4, dtype=torch.long), segment_ids=torch.zeros(1, 4, dtype=torch.long))
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="segment_ids has shape"):
        model(torch.ones(1, 4, dtype=torch.long), segment_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 0"):
        model(torch.ones(1, 4, dtype=torch.long), segment_ids=torch.full((1, 4), -3))


def test_disable_restores_plain_forward():
    model = tiny_model("llama", "sdpa")
    assert attention.is_enabled(model)
    segmask.disable(model)
    assert not attention.is_enabled(model)
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        # transformers itself ignores unknown kwargs: without the hook the mask is plain causal again
        assert torch.equal(
            model(ids, segment_ids=torch.zeros(1, 6, dtype=torch.long)).logits, model(ids).logits
        )


# ---------------------------------------------------------------- the real pretrained stories260K


@pytest.fixture(scope="module")
def stories(stories_path):
    model = AutoModelForCausalLM.from_pretrained(stories_path, attn_implementation="sdpa").eval()
    return segmask.enable(model)


def test_stories_no_leak_to_causal_positions(stories):
    torch.manual_seed(4)
    ids = torch.randint(3, 512, (1, 24))
    seg = torch.tensor([[0] * 6 + [1] * 8 + [-1] * 10])
    with torch.no_grad():
        base = stories(ids, segment_ids=seg).logits
        for position in range(14, 23):  # every causal position but the last
            changed = ids.clone()
            changed[0, position + 1 :] = torch.randint(3, 512, (23 - position,))
            out = stories(changed, segment_ids=seg).logits
            assert (out[0, : position + 1] - base[0, : position + 1]).abs().max() == 0, position


def test_stories_mas_is_on_inside_a_segment_and_segments_are_isolated(stories):
    torch.manual_seed(5)
    ids = torch.randint(3, 512, (1, 24))
    seg = torch.tensor([[0] * 6 + [1] * 8 + [-1] * 10])
    changed = ids.clone()
    changed[0, 12] = (ids[0, 12] + 7) % 509 + 3  # a later token inside the user segment (positions 6..13)
    with torch.no_grad():
        base = stories(ids, segment_ids=seg).logits
        out = stories(changed, segment_ids=seg).logits
    # earlier tokens of the same segment see the change: MAS is on
    assert (out[0, 6:12] - base[0, 6:12]).abs().max() > 1e-4
    # the earlier segment does not
    assert (out[0, :6] - base[0, :6]).abs().max() == 0
    # and under causal nothing before the change moves
    with torch.no_grad():
        causal_base = stories(ids).logits
        causal_out = stories(changed).logits
    assert (causal_out[0, :12] - causal_base[0, :12]).abs().max() == 0
