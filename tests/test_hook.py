"""`segmask.enable` on every model family and backend: exact when causal, consistent across backends under MAS,
exact with packed documents and a KV cache, and leak-free on the real pretrained stories260K; the "segmask"
attention implementation: plain SDPA without a layout, MAS with one, one plan and one mask per forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import CASES, TOLERANCE, random_qkv, reference
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import segmask
from segmask import attention_plan, compat, fast_attention, hook, masks
from segmask.attention_plan import Layout
from segmask.hook import segmask_attention_forward

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


def test_the_fast_path_under_bf16_autocast_equals_the_dense_route():
    """Training in bf16 (segmask train, TRL) runs under autocast: rotary embeddings hand the attention float32
    q and k next to a bf16 v. The fast path takes autocast's dtype as SDPA does (it raised a dtype error)."""
    ids = torch.randint(1, 128, (1, 12))
    losses = {}
    for backend in ("segmask", "sdpa"):
        model = tiny_model("llama", backend).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, segment_ids=SEGMENTS[:1], labels=ids)
        out.loss.backward()
        losses[backend] = out.loss.item()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert losses["segmask"] == pytest.approx(losses["sdpa"], abs=2e-2)


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
    assert hook.is_enabled(model)
    segmask.disable(model)
    assert not hook.is_enabled(model)
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        # transformers itself would ignore them and run causal: segmask's guard refuses instead
        with pytest.raises(segmask.NotEnabledError):
            model(ids, segment_ids=torch.zeros(1, 6, dtype=torch.long))
        # causal ids ask for nothing the plain model does not do
        assert torch.equal(model(ids, segment_ids=torch.full((1, 6), -1)).logits, model(ids).logits)


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


@pytest.fixture
def small_pieces(monkeypatch):
    """Tiny sequences exercise long-segment blocks, band tiles and reversed squares only with a small piece
    and a small band (as throughout tests/test_fast_attention.py)."""
    monkeypatch.setattr(fast_attention, "PIECE", 3)
    monkeypatch.setattr(fast_attention, "BAND", 2)


# ------------------------------------------------------------ the "segmask" attention implementation


class FakeAttention(torch.nn.Module):
    def __init__(self, groups: int = 2, sliding_window: int | None = None):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.sliding_window = groups, True, sliding_window


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("with_padding", [False, True])
def test_without_layout_is_sdpa_attention_forward(with_padding):
    q, k, v, _ = random_qkv(2, 6, 6)
    mask = None
    if with_padding:
        mask = masks.sdpa_mask(torch.full((2, 6), -1), torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))
    module = FakeAttention()
    ours, weights = segmask_attention_forward(module, q, k, v, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert weights is None and torch.equal(ours, theirs)


@pytest.mark.usefixtures("small_pieces")
def test_with_layout_is_mas():
    segment_ids, attention_mask = CASES["left padding"][:2]
    q, k, v, _ = random_qkv(2, 8, 8)
    layout = Layout(segment_ids, attention_mask)
    placeholder = torch.ones((), dtype=torch.bool).expand(2, 1, 8, 8)
    out, _ = segmask_attention_forward(FakeAttention(), q, k, v, placeholder, segmask_layout=layout)
    assert out.shape == (2, 8, 4, 8) and out.is_contiguous()
    assert (out - reference(q, k, v, segment_ids, attention_mask).transpose(1, 2)).abs().max() < TOLERANCE


@pytest.mark.usefixtures("small_pieces")
def test_sliding_window_layer_takes_the_dense_route():
    segment_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1, -1, -1]])
    q, k, v, _ = random_qkv(1, 10, 10)
    out, _ = segmask_attention_forward(
        FakeAttention(sliding_window=3), q, k, v, None, segmask_layout=Layout(segment_ids)
    )
    function = masks.and_masks(masks.mask_function(segment_ids), masks.window_function(3))
    mask = masks.never_empty(masks.evaluate(function, 1, 10, 10, q.device))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    assert (out - expected).abs().max() < TOLERANCE


@pytest.mark.usefixtures("small_pieces")
def test_keys_other_than_the_mask_was_built_for_are_refused():
    """The kernel never truncates or pads silently: a layer whose key count differs from the cache's
    reported length when the mask was built raises, naming both counts."""
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1]])
    q, k, v, _ = random_qkv(1, 3, 8)
    too_few_keys = (k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match="built for 8 keys .* has 5 keys"):
        segmask_attention_forward(FakeAttention(), q, *too_few_keys, None, segmask_layout=Layout(segment_ids))
    stale = Layout(segment_ids, key_lengths={None: 8})
    longer = (torch.cat([k, k], 2), torch.cat([v, v], 2))
    with pytest.raises(ValueError, match="built for 8 keys .* has 16 keys"):
        segmask_attention_forward(FakeAttention(), q, *longer, None, segmask_layout=stale)
    # a static cache reports its unused slots: those (and only those) are dropped
    static = Layout(segment_ids, key_lengths={None: 16})
    out, _ = segmask_attention_forward(FakeAttention(), q, *longer, None, segmask_layout=static)
    expected, _ = segmask_attention_forward(
        FakeAttention(), q, k, v, None, segmask_layout=Layout(segment_ids)
    )
    assert torch.equal(out, expected)


def twin_models(config):
    """The same random weights under "segmask" and "sdpa"."""
    hook.register()
    models = []
    for implementation in ("segmask", "sdpa"):
        torch.manual_seed(0)
        models.append(
            AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation).eval()
        )
    return models


@pytest.mark.usefixtures("small_pieces")
def test_registered_implementation_without_segment_ids_is_sdpa():
    fast, sdpa = twin_models(transformers.LlamaConfig(num_key_value_heads=2, **TINY))
    input_ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.tensor([[1] * 10, [0, 0, 0] + [1] * 7])
    with torch.no_grad():
        assert torch.equal(fast(input_ids).logits, sdpa(input_ids).logits)
        assert torch.equal(
            fast(input_ids, attention_mask=attention_mask).logits,
            sdpa(input_ids, attention_mask=attention_mask).logits,
        )
    generated = [
        m.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
        for m in (fast, sdpa)
    ]
    assert torch.equal(*generated)


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize(
    "config",
    [
        transformers.LlamaConfig(num_key_value_heads=2, **TINY),
        transformers.MistralConfig(num_key_value_heads=2, sliding_window=4, **TINY),
    ],
    ids=["llama", "mistral-sliding-window"],
)
def test_enabled_model_matches_sdpa_under_mas(config):
    """Through ``segmask.enable``: logits and LoRA-free parameter gradients equal the dense sdpa route."""
    fast, sdpa = (segmask.enable(m) for m in twin_models(config))
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1, -1, -1], [-1, -1, -1, 0, 0, 1, 1, -1, -1, -1]])
    attention_mask = torch.tensor([[1] * 10, [0, 0, 0] + [1] * 7])
    input_ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (fast, sdpa):
        model.zero_grad()
        logits = model(input_ids, attention_mask=attention_mask, segment_ids=segment_ids).logits
        logits[attention_mask.bool()].square().mean().backward()
        results.append((logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad))
    (fast_logits, fast_grad), (sdpa_logits, sdpa_grad) = results
    real = attention_mask.bool()
    assert (fast_logits - sdpa_logits)[real].abs().max() < TOLERANCE
    assert (fast_grad - sdpa_grad).abs().max() < TOLERANCE


# --------------------------------------------------------------------------- once per forward


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize(
    "family, plans, dense_masks",
    [("llama", 1, 0), ("gemma3", 1, 1), ("mistral", 0, 1)],
    ids=["full attention", "full and sliding layers", "sliding layers"],
)
def test_one_plan_and_one_mask_per_forward(monkeypatch, family, plans, dense_masks):
    """Four decoder layers share one plan (full attention) and one dense mask (sliding window) per forward
    call, forward and backward; the next forward call builds its own."""
    layers = dict(TINY, num_hidden_layers=4)
    config = {
        "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **layers),
        "gemma3": lambda: transformers.Gemma3TextConfig(
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
            **layers,
        ),
        "mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, sliding_window=4, **layers),
    }[family]()
    fast, _ = twin_models(config)
    fast = segmask.enable(fast)
    assert fast.config._attn_implementation == "segmask"
    counts = {"plan": 0, "dense": 0}
    plan, dense = attention_plan.plan_layout, masks.dense

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(attention_plan, "plan_layout", counted("plan", plan))
    monkeypatch.setattr(masks, "dense", counted("dense", dense))
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1, -1, -1], [0, 0, -1, 1, 1, -1, 2, 2, -1, -1]])
    input_ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    fast(input_ids, segment_ids=segment_ids).logits.square().mean().backward()
    assert counts == {"plan": plans, "dense": dense_masks}
    fast(input_ids, segment_ids=segment_ids)
    assert counts == {"plan": 2 * plans, "dense": 2 * dense_masks}
