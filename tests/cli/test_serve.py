"""``segmask serve``: its defaults (loopback), flag validation, and a real server process answering the
``openai`` client with ``segmask generate``'s greedy text behind an API key, then shutting down on SIGINT;
``--chat-template`` gives a base model without a template (stories260K) a chat endpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import PLAIN_ROLES, ROOT
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

import segmask
import segmask.serving.app
from segmask.cli import build_parser, main
from segmask.generation import generate
from segmask.loading import load_model

STORY = "Once upon a time, there was a little dog named"


def test_defaults_bind_loopback(stories_path):
    args = build_parser().parse_args(["serve", "--model", str(stories_path)])
    assert (args.host, args.port, args.max_batch, args.max_queue, args.max_context) == (
        "127.0.0.1",
        8000,
        8,
        64,
        None,
    )
    assert args.mask is None and args.prefix_cache_mb == 256.0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch", "0"], "max_batch must be >= 1"),
        (["--max-queue", "0"], "max_queue must be >= 1"),
        (["--max-context", "1"], "max_context must be >= 2"),
        (["--port", "70000"], "--port must be in"),
        (["--prefix-cache-mb", "-1"], "prefix_cache_mb must be >= 0"),
        (["--retry-after-s", "0"], "retry_after_s must be >= 1"),
        (["--api-key", ""], "--api-key is empty"),  # `--api-key "$KEY"` with KEY unset: never serve openly
        (["--api-key", "sekret "], "leading or trailing whitespace"),  # no client could send it
        (["--max-messages", "0"], "max_messages must be >= 1"),
        (["--max-prompt-tokens", "0"], "max_prompt_tokens must be >= 1"),
    ],
)
def test_bad_flags_fail_before_loading(stories_path, capsys, flags, message, monkeypatch):
    monkeypatch.setenv("SEGMASK_API_KEY", "from-the-environment")  # an empty --api-key does not fall back
    assert main(["serve", "--model", str(stories_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_api_key_comes_from_the_environment_unless_empty(stories_path, monkeypatch):
    monkeypatch.setenv("SEGMASK_API_KEY", "sekret")
    assert build_parser().parse_args(["serve", "--model", str(stories_path)]).api_key == "sekret"
    monkeypatch.setenv("SEGMASK_API_KEY", "")  # set but empty: as if unset
    assert build_parser().parse_args(["serve", "--model", str(stories_path)]).api_key is None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_server_process_answers_the_openai_client(stories_path):
    port = free_port()
    command = [
        sys.executable, "-m", "segmask", "serve", "--model", str(stories_path), "--port", str(port),
        "--api-key", "sekret", "--max-context", "128", "--max-batch", "4",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)

        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        model = client.models.list().data[0]
        assert (model.id, model.model_extra["max_context"], model.model_extra["mask_policy"]) == (
            "stories260K",
            128,
            "mas",
        )
        reply = client.completions.create(model="stories260K", prompt=STORY, max_tokens=12, temperature=0)

        stories = segmask.enable(AutoModelForCausalLM.from_pretrained(stories_path).eval())
        tokenizer = AutoTokenizer.from_pretrained(stories_path)
        [expected] = generate(stories, tokenizer, STORY, policy="mas", max_new_tokens=12, do_sample=False)
        assert reply.choices[0].text == expected.text

        with pytest.raises(openai.BadRequestError, match="no chat template"):  # stories260K has none
            client.chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "Hi"}])
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output
    assert f"on http://127.0.0.1:{port}/v1" in output


# ------------------------------------------------------------------------------------------ chat templates

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


def test_serve_refuses_a_bad_template_in_one_line(stories_path, capsys):
    assert main(["serve", "--model", str(stories_path), "--chat-template", "missing.jinja"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "segmask serve: error: chat template missing.jinja not found (pass a Jinja file, or the template itself)"
    )
