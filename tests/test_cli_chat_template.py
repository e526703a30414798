"""``--chat-template`` on the commands whose own test files cover other things: ``segmask serve`` gives a
base model without a template (stories260K) a chat endpoint, and ``segmask eval`` loads with the template.
(generate and chat: tests/test_cli_generate.py, tests/test_cli_chat.py; the reader: tests/test_loading.py.)"""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

import segmask.cli.eval
import segmask.loading
import segmask.serving.app
from segmask.cli import main
from segmask.generation import generate
from segmask.loading import load, load_model

PLAIN_ROLES = Path(__file__).parent / "fixtures" / "chat_templates" / "plain_roles.jinja"
MESSAGES = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A cat?"}]


def serve_once(monkeypatch, argv: list[str], body: dict) -> tuple[int, dict]:
    """Run `segmask serve ARGV` in-process; instead of listening, its app answers one chat request."""
    answers = []

    def run(app, **options):
        with TestClient(app) as client:  # runs the app's lifespan (the model thread) like uvicorn
            response = client.post("/v1/chat/completions", json=body)
            answers.append((response.status_code, response.json()))

    monkeypatch.setattr(segmask.serving.app.uvicorn, "run", run)
    assert main(["serve", *argv]) == 0
    [answer] = answers
    return answer


def test_serve_with_a_chat_template_answers_chat_completions(stories_path, monkeypatch, capsys):
    body = {"model": "stories260K", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    status, answer = serve_once(monkeypatch, ["--model", str(stories_path)], body)
    assert (status, answer["error"]["code"]) == (400, "no_chat_template")  # without the flag
    argv = ["--model", str(stories_path), "--chat-template", str(PLAIN_ROLES)]
    status, answer = serve_once(monkeypatch, argv, body)
    assert status == 200, answer
    model, tokenizer, _ = load_model(stories_path, chat_template=PLAIN_ROLES)
    [expected] = generate(model, tokenizer, [MESSAGES], policy="mas", max_new_tokens=6, do_sample=False)
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert answer["usage"]["completion_tokens"] == len(expected.token_ids)


def test_serve_and_eval_refuse_a_bad_template_in_one_line(stories_path, commonsense_dir, tmp_path, capsys):
    assert main(["serve", "--model", str(stories_path), "--chat-template", "missing.jinja"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "segmask serve: error: chat template missing.jinja not found (pass a Jinja file, or the template itself)"
    )
    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(stories_path), "--data-dir", str(commonsense_dir), "--tasks", "boolq"]
    argv += ["--out", str(out), "--no-progress", "--chat-template", "{% if %}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("segmask eval: error: the inline chat template is not valid Jinja")
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_eval_loads_the_model_with_the_chat_template(stories_path, commonsense_dir, tmp_path, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        loaded = load(*args, **kwargs)
        seen.append(loaded.tokenizer.chat_template)
        return loaded

    monkeypatch.setattr(segmask.loading, "load", spy)
    argv = ["eval", "--model", str(stories_path), "--data-dir", str(commonsense_dir), "--tasks", "boolq"]
    argv += ["--limit", "1", "--scoring", "loglik", "--out", str(tmp_path / "r.json"), "--no-progress"]
    assert main([*argv, "--chat-template", str(PLAIN_ROLES)]) == 0
    assert seen == [PLAIN_ROLES.read_text()]
