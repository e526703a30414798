"""`segmask generate` end to end: prompt or messages file, JSON output, sampling flags, clear errors, and a
real chat model (SmolLM2-135M-Instruct from its GGUF file) answering a question."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PLAIN_ROLES, conversion_cache, smollm2_gguf

from segmask import loading
from segmask.cli import main
from segmask.generation import encode_prompt, generate
from segmask.loading import load_model

STORY = "Once upon a time, there was a little dog named"


def run_json(capsys, *argv: str) -> dict:
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_raw_prompt_json_equals_library(stories_path, capsys):
    result = run_json(
        capsys, "--model", str(stories_path), "--mask", "mas", "--prompt", STORY, "--max-new-tokens", "8"
    )
    model, tokenizer, _ = load_model(stories_path)
    [expected] = generate(model, tokenizer, STORY, policy="mas", max_new_tokens=8, do_sample=False)
    assert result == {"text": expected.text, "token_ids": expected.token_ids}
    causal = run_json(
        capsys, "--model", str(stories_path), "--mask", "causal", "--prompt", STORY, "--max-new-tokens", "8"
    )
    assert causal["token_ids"] != result["token_ids"]


def test_causal_sink_flag_equals_library(stories_path, capsys):
    argv = ["--model", str(stories_path), "--mask", "mas", "--prompt", STORY, "--max-new-tokens", "8"]
    result = run_json(capsys, *argv, "--causal-sink")
    model, tokenizer, _ = load_model(stories_path)
    [expected] = generate(
        model, tokenizer, STORY, policy="mas", causal_sink=True, max_new_tokens=8, do_sample=False
    )
    assert result == {"text": expected.text, "token_ids": expected.token_ids}
    assert run_json(capsys, *argv, "--no-causal-sink") == run_json(capsys, *argv)  # off unless asked


def test_messages_file_and_prompt_use_the_chat_template(stories_chat, tmp_path, capsys):
    messages = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A cat?"}]
    (tmp_path / "chat.json").write_text(json.dumps(messages))
    model, tokenizer, _ = load_model(stories_chat)
    argv = ["--model", str(stories_chat), "--max-new-tokens", "6"]
    from_file = run_json(capsys, *argv, "--messages", str(tmp_path / "chat.json"))
    assert from_file["token_ids"] == generate(model, tokenizer, [messages], max_new_tokens=6)[0].token_ids
    from_prompt = run_json(capsys, *argv, "--prompt", "A cat?")
    user_only = [{"role": "user", "content": "A cat?"}]
    assert from_prompt["token_ids"] == generate(model, tokenizer, [user_only], max_new_tokens=6)[0].token_ids
    record = {"instruction": "Name a color.", "input": ""}
    (tmp_path / "record.json").write_text(json.dumps(record))
    plain = main(["generate", *argv, "--messages", str(tmp_path / "record.json")])
    assert plain == 0
    assert capsys.readouterr().out == generate(model, tokenizer, record, max_new_tokens=6)[0].text + "\n"


def test_chat_template_flag_lets_a_base_model_take_messages(stories_path, tmp_path, capsys):
    """stories260K has no chat template; --chat-template FILE gives it one, and the tokens are the library's
    with that template set (MAS: one segment per message)."""
    messages = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A cat?"}]
    (tmp_path / "chat.json").write_text(json.dumps(messages))
    argv = ["--model", str(stories_path), "--mask", "mas", "--max-new-tokens", "6"]
    assert main(["generate", *argv, "--messages", str(tmp_path / "chat.json")]) == 2
    assert "has no chat template; pass one with --chat-template FILE" in capsys.readouterr().err
    template = ["--chat-template", str(PLAIN_ROLES)]
    from_file = run_json(capsys, *argv, *template, "--messages", str(tmp_path / "chat.json"))
    model, tokenizer, _ = load_model(stories_path)
    tokenizer.chat_template = PLAIN_ROLES.read_text()
    [expected] = generate(model, tokenizer, [messages], policy="mas", max_new_tokens=6, do_sample=False)
    assert from_file == {"text": expected.text, "token_ids": expected.token_ids}
    # --prompt becomes one user message once the model has a template
    from_prompt = run_json(capsys, *argv, *template, "--prompt", "A cat?")
    user_only = [{"role": "user", "content": "A cat?"}]
    [expected] = generate(model, tokenizer, [user_only], policy="mas", max_new_tokens=6, do_sample=False)
    assert from_prompt["token_ids"] == expected.token_ids
    inline = run_json(capsys, *argv, "--chat-template", PLAIN_ROLES.read_text(), "--prompt", "A cat?")
    assert inline == from_prompt


def test_a_bad_chat_template_is_a_one_line_error(stories_path, tmp_path, capsys):
    base = ["generate", "--model", str(stories_path), "--prompt", "x", "--chat-template"]
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    for template, message in [
        ("missing.jinja", "segmask generate: error: chat template missing.jinja not found"),
        (str(tmp_path / "bad.jinja"), f"segmask generate: error: chat template {tmp_path / 'bad.jinja'} is not valid Jinja (line 1)"),
        ("{% if %}", "segmask generate: error: the inline chat template is not valid Jinja (line 1)"),
    ]:  # fmt: skip
        assert main([*base, template]) == 2
        captured = capsys.readouterr()
        # one line, after transformers' progress bar if the weights loaded (a Jinja error needs the tokenizer)
        assert captured.err.splitlines()[-1].startswith(message), captured.err
        assert "Traceback" not in captured.err and captured.out == ""


def test_sampling_flags(stories_path, capsys, monkeypatch):
    seen = {}

    def spy(model, tokenizer, inputs, policy, **kwargs):
        seen.update(kwargs, policy=policy)
        return real(model, tokenizer, inputs, policy, **kwargs)

    import segmask.generation

    real = segmask.generation.generate
    monkeypatch.setattr(segmask.generation, "generate", spy)
    base = ["generate", "--model", str(stories_path), "--prompt", STORY, "--max-new-tokens", "3"]
    assert main([*base, "--temperature", "0.7", "--top-p", "0.9"]) == 0
    assert seen == dict(
        max_new_tokens=3,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        policy="mas",
        causal_sink=None,  # no run: the policy's default (segmask.policies.sink_on)
        template="alpaca",
    )
    seen.clear()
    assert main([*base, "--greedy", "--mask", "prefix"]) == 0
    assert seen == dict(
        max_new_tokens=3, do_sample=False, policy="prefix", causal_sink=None, template="alpaca"
    )
    capsys.readouterr()


def test_bad_flags_exit_with_a_message(stories_path, tmp_path, capsys):
    base = ["generate", "--model", str(stories_path)]
    assert main([*base, "--prompt", "x", "--greedy", "--temperature", "0.5"]) == 2
    assert "--greedy cannot be combined" in capsys.readouterr().err
    assert main([*base, "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be positive" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main([*base, "--messages", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no model at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--prompt", "x", "--messages", "m.json"])  # mutually exclusive


@pytest.mark.slow
def test_smollm2_answers_a_short_chat(tmp_path_factory, capsys, monkeypatch):
    """The real instruct model from its GGUF file answers through `segmask generate`; causal is
    token-identical to plain transformers, and MAS prefill equals the naive full MAS forward (SmolLM2 was
    not trained with MAS, so its MAS answers are worse)."""
    monkeypatch.setenv(loading.CACHE_ENV, str(conversion_cache(tmp_path_factory)))
    gguf = str(smollm2_gguf())
    question = "What is the capital of France?"
    answer = run_json(
        capsys, "--model", gguf, "--prompt", question, "--max-new-tokens", "8", "--mask", "causal"
    )
    assert "Paris" in answer["text"]

    model, tokenizer, _ = load_model(gguf)
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        plain = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert (
        answer["token_ids"] == plain[0, prompt["input_ids"].shape[1] :].tolist()[: len(answer["token_ids"])]
    )

    [mas] = generate(model, tokenizer, [messages], policy="mas", max_new_tokens=6, do_sample=False)
    encoded = encode_prompt(tokenizer, messages, "mas")
    ids, segments = list(encoded.input_ids), list(encoded.segment_ids)
    assert set(segments) == {0, -1}  # the template's default system text belongs to the user turn
    with torch.no_grad():
        for _ in range(len(mas.token_ids)):
            logits = model(torch.tensor([ids]), segment_ids=torch.tensor([segments])).logits
            ids.append(int(logits[0, -1].argmax()))
            segments.append(-1)
    assert mas.token_ids == ids[len(encoded.input_ids) :]


def test_output_is_free_of_library_warnings(stories_path):
    """What users see is the result: no deprecation or other warnings from transformers or torch."""
    import subprocess
    import sys

    argv = ["-m", "segmask", "generate", "--model", str(stories_path), "--mask", "mas"]
    result = subprocess.run(
        [sys.executable, *argv, "--prompt", STORY, "--max-new-tokens", "6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "deprecated" not in result.stderr.lower() and "warning" not in result.stderr.lower(), result.stderr


def test_template_flag_renders_an_instruction_record(stories_path, tmp_path, capsys):
    """--template paper prompts a record with the official evaluation text; absent, alpaca; bad, exit 2."""
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"instruction": "Is the sky blue?", "input": ""}))
    argv = ["--model", str(stories_path), "--mask", "mas", "--messages", str(record), "--max-new-tokens", "4"]
    model, tokenizer, _ = load_model(stories_path)
    seen = []
    for flags, template in [(["--template", "paper"], "paper"), ([], "alpaca")]:
        result = run_json(capsys, *argv, *flags)
        [expected] = generate(
            model, tokenizer, {"instruction": "Is the sky blue?", "input": ""}, policy="mas",
            template=template, max_new_tokens=4, do_sample=False,
        )  # fmt: skip
        assert result == {"text": expected.text, "token_ids": expected.token_ids}
        seen.append(
            encode_prompt(
                tokenizer, {"instruction": "Is the sky blue?", "input": ""}, "mas", template=template
            )
        )
    # the paper's blocks (see test_evaluation), the BOS causal (mas's default sink)
    assert seen[0].segment_ids == [-1] + [0] * 88 + [1] * 58 + [-1] * 24
    assert len(seen[1]) == 107
    with pytest.raises(SystemExit) as stop:
        main(["generate", *argv, "--template", "official"])
    assert stop.value.code == 2 and "invalid choice: 'official'" in capsys.readouterr().err


def test_past_the_models_context_is_a_one_line_error(stories_path, tmp_path, capsys):
    """stories260K has 512 positions: a long prompt, or too many new tokens, is refused before running."""
    base = ["generate", "--model", str(stories_path)]
    assert main([*base, "--prompt", "Tim has a dog. " * 120, "--max-new-tokens", "5"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading bar
    assert "more than the model's context of 512 positions" in last and "Traceback" not in last
    assert main([*base, "--prompt", STORY, "--max-new-tokens", "700"]) == 2
    assert "up to 700 new tokens" in capsys.readouterr().err
    big = tmp_path / "big.json"
    big.write_text(json.dumps([{"role": "user", "content": "word " * 200_000}]))
    assert main([*base, "--chat-template", str(PLAIN_ROLES), "--messages", str(big)]) == 2
    assert "more than the model's context" in capsys.readouterr().err
