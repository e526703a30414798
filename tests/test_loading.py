"""`segmask.load_model`: transformers folders, GGUF files converted once (atomically) to safetensors, and
fine-tuned output folders whose saved policy becomes the default (overriding it warns)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import PLAIN_ROLES, conversion_cache, smollm2_gguf
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from segmask import hook, loading
from segmask.loading import load_model
from segmask.runs import RUN_FILE


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    return loading.gguf_to_safetensors(smollm2_gguf(), conversion_cache(tmp_path_factory))


def ids(*tokens: int) -> torch.Tensor:
    return torch.tensor([list(tokens)])


def write_run(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_FILE).write_text(json.dumps(fields))


def test_transformers_folder_loads_enabled_and_unchanged(stories_path):
    model, tokenizer, policy = load_model(stories_path)
    plain = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    tokens = torch.tensor([tokenizer("Once upon a time")["input_ids"]])
    assert policy == "mas"
    assert hook.is_enabled(model) and not model.training
    assert torch.equal(model(tokens).logits, plain(tokens).logits)
    # the segment mask is on: a bidirectional prompt changes the first token's output
    bidirectional = model(tokens, segment_ids=torch.zeros_like(tokens)).logits
    assert not torch.allclose(bidirectional[0, 0], plain(tokens).logits[0, 0])


def test_full_model_run_folder_policy_default_and_override_warning(stories_path, tmp_path):
    run = tmp_path / "run"
    AutoModelForCausalLM.from_pretrained(stories_path).save_pretrained(run)
    shutil.copy(stories_path / "tokenizer.json", run)
    shutil.copy(stories_path / "tokenizer_config.json", run)
    write_run(run, policy="causal", base_model=str(stories_path), template="chat", adapter=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, policy = load_model(run)
        _, _, same = load_model(run, policy="causal")
    assert policy == same == "causal"
    with pytest.warns(UserWarning, match="trained with mask policy 'causal'.*hurts"):
        _, _, override = load_model(run, policy="mas")
    assert override == "mas"


def test_adapter_run_folder_is_merged_over_its_base(stories_path, tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(stories_path)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora).eval()
    run = tmp_path / "runs" / "lora"
    peft_model.save_pretrained(run)
    # base_model relative to the run folder
    write_run(
        run, policy="prefix", base_model=os.path.relpath(stories_path, run), template="chat", adapter=True
    )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer, policy = load_model(run)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]  # peft's, kept quiet
    tokens = ids(1, 403, 407, 261, 378)
    segments = torch.tensor([[0, 0, 0, -1, -1]])
    expected = hook.enable(peft_model)(tokens, segment_ids=segments).logits
    plain = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    assert policy == "prefix" and tokenizer("Once")["input_ids"]
    assert not hasattr(model, "peft_config")  # merged
    torch.testing.assert_close(model(tokens, segment_ids=segments).logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(tokens).logits, plain(tokens).logits, atol=1e-3)


def test_gguf_is_converted_once_to_safetensors(smollm2_folder, tmp_path_factory, monkeypatch):
    assert (smollm2_folder / "model.safetensors").is_file()
    assert (smollm2_folder / "tokenizer_config.json").is_file()
    assert not list(smollm2_folder.parent.glob(".*"))  # no staging folder left behind

    def no_conversion(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(loading, "_convert_gguf", no_conversion)
    monkeypatch.setenv(loading.CACHE_ENV, str(conversion_cache(tmp_path_factory)))
    assert loading.gguf_to_safetensors(smollm2_gguf()) == smollm2_folder
    model, tokenizer, policy = load_model(smollm2_gguf(), policy="causal")
    assert policy == "causal" and hook.is_enabled(model)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False
    )


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF")

    def half_written(gguf_file, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(loading, "_convert_gguf", half_written)
    with pytest.raises(RuntimeError, match="interrupted"):
        loading.gguf_to_safetensors(fake, tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_cache_folder_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "here"))
    assert loading.cache_dir() == tmp_path / "here"
    monkeypatch.delenv(loading.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_dir() == tmp_path / "xdg" / "segmask"


def test_bad_paths_and_run_files_are_named(stories_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model(tmp_path / "nothing")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(stories_path / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only loads safetensors"):
        load_model(pickled)
    write_run(tmp_path / "bad_policy", policy="diagonal", base_model=str(stories_path), adapter=False)
    with pytest.raises(ValueError, match="unknown mask policy 'diagonal'"):
        load_model(tmp_path / "bad_policy")
    write_run(tmp_path / "no_adapter", policy="mas", base_model=str(stories_path), adapter=True)
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_model(tmp_path / "no_adapter")
    write_run(tmp_path / "hub_base", policy="mas", base_model="HuggingFaceTB/SmolLM2-135M", adapter=True)
    with pytest.raises(FileNotFoundError, match="not a local path"):
        load_model(tmp_path / "hub_base")
    with pytest.raises(ValueError, match="unknown mask policy"):
        load_model(stories_path, policy="bidirectional")


def test_globs_resolve_to_exactly_one_model(stories_path, tmp_path):
    pattern = str(stories_path.parent / (stories_path.name[:-1] + "*"))
    assert loading.resolve_model(pattern) == stories_path
    model, tokenizer, _ = load_model(pattern)
    assert tokenizer.vocab_size == loading.load_tokenizer(stories_path).vocab_size
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="matches 2 paths, expected exactly one"):
        loading.resolve_model(tmp_path / "*")


def test_a_missing_model_is_one_error_for_every_caller(tmp_path):
    with pytest.raises(loading.ModelNotFoundError, match="no model at") as raised:
        loading.load_tokenizer(tmp_path / "nothing")
    assert isinstance(raised.value, FileNotFoundError) and isinstance(raised.value, ValueError)


def test_chat_template_from_a_file_or_inline_as_vllm_reads_it(tmp_path):
    assert loading.read_chat_template(PLAIN_ROLES) == PLAIN_ROLES.read_text()
    assert loading.read_chat_template(str(PLAIN_ROLES)) == PLAIN_ROLES.read_text()
    # not a file but Jinja-like: the template itself, its escapes decoded (a shell line has no newlines)
    assert loading.read_chat_template(r"{{ m }}\n¿ünï 字") == "{{ m }}\n¿ünï 字"
    with pytest.raises(FileNotFoundError, match=r"chat template no/such\.jinja not found"):
        loading.read_chat_template("no/such.jinja")  # path-like: never taken as a template
    with pytest.raises(FileNotFoundError, match="not found"):
        loading.read_chat_template(tmp_path / "missing{}.jinja")  # a Path is always a file
    with pytest.raises(ValueError, match="is not a file"):
        loading.read_chat_template(str(tmp_path))
    (tmp_path / "empty.jinja").write_text(" \n")
    with pytest.raises(ValueError, match="empty.jinja is empty"):
        loading.read_chat_template(str(tmp_path / "empty.jinja"))
    (tmp_path / "latin1.jinja").write_bytes("{{ 'café' }}".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        loading.read_chat_template(str(tmp_path / "latin1.jinja"))


def test_set_chat_template_refuses_invalid_jinja_and_keeps_the_old_one(stories_tokenizer, tmp_path):
    before = stories_tokenizer.chat_template
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(ValueError, match=r"chat template .*bad\.jinja is not valid Jinja \(line 2\)"):
        loading.set_chat_template(stories_tokenizer, str(tmp_path / "bad.jinja"))
    with pytest.raises(ValueError, match=r"the inline chat template is not valid Jinja \(line 1\)"):
        loading.set_chat_template(stories_tokenizer, "{% if %}")
    assert stories_tokenizer.chat_template == before
    # valid Jinja that refuses a conversation is set: each conversation's render says what it refuses
    refusing = "{{ raise_exception('needs a system message') }}"
    loading.set_chat_template(stories_tokenizer, refusing)
    assert stories_tokenizer.chat_template == refusing
    stories_tokenizer.chat_template = before


def test_load_model_with_a_chat_template_lets_a_base_model_chat(stories_path, monkeypatch):
    from segmask.segments import encode_chat

    _, plain, _ = load_model(stories_path)
    assert plain.chat_template is None  # stories260K has none
    model, tokenizer, _ = load_model(stories_path, chat_template=PLAIN_ROLES)
    assert tokenizer.chat_template == PLAIN_ROLES.read_text()
    messages = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A cat?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "System: Tell stories.\nUser: A cat?\nAssistant:"
    encoded = encode_chat(tokenizer, messages, policy="mas", add_generation_prompt=True)
    assert encoded.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # MAS: one segment per message, the generation prompt causal; token 0 ("System", no BOS) is the sink
    assert encoded.segment_ids[0] == -1 and list(dict.fromkeys(encoded.segment_ids[1:])) == [0, 1, -1]
    user_start = encoded.segment_ids.index(1)
    assert tokenizer.decode(encoded.input_ids[user_start:]).startswith("User: A cat?")

    def never(*args, **kwargs):
        raise AssertionError("the weights loaded before the bad template was found")

    monkeypatch.setattr(loading, "_load_transformers", never)
    with pytest.raises(FileNotFoundError, match="chat template missing.jinja not found"):
        load_model(stories_path, chat_template="missing.jinja")
    with pytest.raises(ValueError, match=r"the inline chat template is not valid Jinja \(line 1\)"):
        load_model(stories_path, chat_template="{% if %}")
