"""Guard tests: one per transformers internal that segmask leans on.

Each fails with a message naming the upstream change, so that a new transformers release that moves one
of them is caught here, by name, instead of as wrong tokens somewhere else.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import Cache

import segmask
from segmask import compat, hook
from segmask.generation import generate_ids

pytestmark = pytest.mark.exactness

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=64, max_position_embeddings=64,
)  # fmt: skip


def config(family: str):
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"], **TINY
        )
    return transformers.LlamaConfig(**TINY)


def model(family: str = "llama", implementation: str = "sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config(family), attn_implementation=implementation).eval()


VERSION = f"transformers {transformers.__version__}"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_causal_lm_forwards_extra_kwargs_to_its_decoder(family):
    """The decoder pre-hook: ``*ForCausalLM.forward`` must hand unknown kwargs (``segment_ids``) to
    ``get_decoder()`` as keyword arguments, with the input ids and the cache."""
    lm = model(family)
    seen = {}

    def spy(module, args, kwargs):
        seen.update(kwargs)
        kwargs.pop("segment_ids", None)
        return args, kwargs

    handle = lm.get_decoder().register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            lm(torch.tensor([[1, 2, 3]]), segment_ids=torch.tensor([[0, 0, -1]]), use_cache=True)
    finally:
        handle.remove()
    assert "segment_ids" in seen, (
        f"{VERSION}: {type(lm).__name__}.forward no longer passes extra keyword arguments to "
        f"model.get_decoder(); segmask's pre-hook would never see segment_ids"
    )
    assert "input_ids" in seen or "inputs_embeds" in seen, f"{VERSION}: the decoder gets no input_ids by name"


def test_attention_interface_registration_reaches_the_layers():
    """``AttentionInterface.register`` + ``set_attn_implementation`` route every layer through segmask's
    function, and kwargs given to the decoder (``segmask_layout``) reach it."""
    hook.register()
    assert "segmask" in transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS, (
        f"{VERSION}: AttentionMaskInterface.register no longer registers a mask function"
    )
    lm = model()
    lm.set_attn_implementation("segmask")
    calls = []
    original = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS["segmask"]

    def probe(module, query, key, value, attention_mask, **kwargs):
        calls.append("segmask_layout" in kwargs)
        return original(module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register("segmask", probe)
    try:
        segmask.enable(lm)
        with torch.no_grad():
            lm(torch.tensor([[1, 2, 3, 4]]), segment_ids=torch.tensor([[0, 0, 1, -1]]))
    finally:
        transformers.AttentionInterface.register("segmask", original)
    assert calls == [True, True], (
        f"{VERSION}: the registered attention function was called {len(calls)} times for 2 layers, with "
        f"decoder kwargs reaching it: {calls}; AttentionInterface registration or kwargs propagation changed"
    )


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cache_argument_is_found_without_a_deprecation_warning(family):
    """segmask passes the cache under the name the installed version expects (``cache`` from 5.24)."""
    lm = model(family)
    name = compat.cache_argument(lm)
    assert name in ("cache", "past_key_values")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            first = lm(torch.tensor([[1, 2, 3]]), use_cache=True)
            cache = compat.output_cache(first)
            assert isinstance(cache, Cache), f"{VERSION}: the forward output holds no Cache"
            lm(torch.tensor([[4]]), **compat.cache_kwargs(lm, cache))
    assert cache.get_seq_length() == 4


def test_the_cache_is_found_among_the_decoder_arguments_by_type():
    lm = model()
    found = []

    def spy(module, args, kwargs):
        found.append(compat.find_cache(kwargs))
        return args, kwargs

    cache = DynamicCache(config=lm.config)
    handle = lm.get_decoder().register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            lm(torch.tensor([[1, 2, 3]]), use_cache=True, **compat.cache_kwargs(lm, cache))
    finally:
        handle.remove()
    assert found == [cache], (
        f"{VERSION}: the decoder no longer receives the Cache object as a keyword argument"
    )
    with pytest.raises(ValueError, match="not a transformers Cache"):
        compat.find_cache({"past_key_values": ((torch.zeros(1),),)})


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_mask_sizes_match_the_keys_each_layer_holds(family):
    """The cache-length lookup: ``get_mask_sizes`` (what masking_utils sizes every mask with) must give
    each layer's key count after the update, full layers from offset 0, sliding layers their window."""
    lm = model(family)
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        lm(torch.arange(1, 8)[None], use_cache=True, **compat.cache_kwargs(lm, cache))  # 7 tokens
    q_len = 3
    types = getattr(lm.config, "layer_types", None) or ["full_attention"]
    for layer_idx, layer_type in enumerate(types):
        length, offset = compat.mask_sizes(cache, q_len, layer_idx)
        new = torch.zeros(1, 2, q_len, 8)
        keys, _ = cache.update(new, new, layer_idx)
        if layer_type == "full_attention":
            assert (length, offset) == (10, 0), (
                f"{VERSION}: get_mask_sizes of a full layer is {(length, offset)}"
            )
        assert keys.shape[2] == length, (
            f"{VERSION}: layer {layer_idx} ({layer_type}) holds {keys.shape[2]} keys but get_mask_sizes said "
            f"{length}; the cache-length lookup changed"
        )


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_prepared_4d_mask_is_used_as_given(implementation):
    """transformers must pass a prepared 4-D ``attention_mask`` to the layers untouched: a full
    (bidirectional) mask equals MAS with the whole row one segment, and differs from causal."""
    lm = model("llama", implementation)
    ids = torch.tensor([[5, 9, 2, 7, 3]])
    full = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    if implementation == "eager":
        full = torch.zeros(1, 1, 5, 5)
    with torch.no_grad():
        given = lm(ids, attention_mask=full).logits
        causal = lm(ids).logits
        segmask.enable(lm, fast=False)
        one_segment = lm(ids, segment_ids=torch.zeros(1, 5, dtype=torch.long)).logits
    assert (given - causal).abs().max() > 1e-3, f"{VERSION}: a prepared 4-D mask was replaced by a causal one"
    assert (given - one_segment).abs().max() < 1e-5, f"{VERSION}: a prepared 4-D mask is not used as given"


def test_segmask_never_warns_about_deprecated_arguments():
    """No library deprecation noise in what users see: generation with KV reuse emits no FutureWarning."""
    lm = segmask.enable(model())
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = generate_ids(lm, ids, torch.tensor([[0, 0, 0, 1, 1, -1]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 9


def test_releases_older_than_the_supported_range_are_refused():
    with pytest.raises(
        compat.TransformersChangedError, match=r"needs transformers >= 5\.18 \(found 5\.17\.0\)"
    ):
        compat.check_version("5.17.0")
    for version in ("5.18.0", "5.24.0", "5.30.0.dev0", "6.0.0"):
        compat.check_version(version)


def test_the_declared_range_is_the_tested_one():
    """pyproject's range, the two lock files make test-compat installs, and compat's bounds agree."""
    from conftest import ROOT

    pyproject = (ROOT / "pyproject.toml").read_text()
    oldest, newest = compat.OLDEST, compat.NEWEST
    assert f'"transformers>={oldest[0]}.{oldest[1]},<{newest[0]}.{newest[1] + 1}"' in pyproject
    locked = {
        name: next(
            line.split("==")[1]
            for line in (ROOT / "requirements" / name).read_text().splitlines()
            if line.startswith("transformers==")
        )
        for name in ("lock.txt", "oldest.txt")
    }
    assert compat.release(locked["lock.txt"]) == newest
    assert compat.release(locked["oldest.txt"]) == oldest


def test_peft_wrapping_emits_no_deprecation_warning():
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with compat.quiet_peft():
            get_peft_model(model(), LoraConfig(r=2, target_modules=["q_proj"]))


def test_the_cache_argument_of_a_peft_wrapped_model_is_its_base_models():
    """peft's forward takes ``**kwargs``: the name comes from the wrapped model, and KV reuse stays exact."""
    from peft import LoraConfig, get_peft_model

    with compat.quiet_peft():
        wrapped = get_peft_model(model(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert compat.cache_argument(wrapped) == compat.cache_argument(wrapped.get_base_model())
    segmask.enable(wrapped)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    segments = torch.tensor([[0, 0, 0, 1, 1, -1]])
    with torch.no_grad():
        full = wrapped(ids, segment_ids=segments).logits
        first = wrapped(ids[:, :3], segment_ids=segments[:, :3], use_cache=True)
        cache = compat.output_cache(first)
        second = wrapped(
            ids[:, 3:], segment_ids=segments[:, 3:], **compat.cache_kwargs(wrapped, cache)
        ).logits
    assert (torch.cat([first.logits, second], 1) - full).abs().max() < 1e-5


def test_chat_templates_compile_without_a_tokenizer_as_transformers_compiles_them():
    """compat.compile_chat_template (a syntax check before any weights load) uses transformers' private
    Jinja environment: its extensions ({% generation %}, {% break %}) compile, a syntax error raises."""
    from jinja2 import TemplateSyntaxError

    compat.compile_chat_template(
        "{% for m in messages %}{% if m['role'] == 'x' %}{% break %}{% endif %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    )
    with pytest.raises(TemplateSyntaxError):
        compat.compile_chat_template("{% for m in messages %}{{ m['content'] }")
