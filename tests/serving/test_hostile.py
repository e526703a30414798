"""The server against a hostile client on loopback (issue 16): each bad request gets its status and OpenAI's
error body, and ``/health`` answers right after it. Covers requests that would freeze the event loop (a
huge conversation: encoded off the loop, linear, capped by max_messages / max_prompt_chars /
max_prompt_tokens), underflowing temperatures, seeds outside int64, every unsupported OpenAI field, auth
edge cases and the API pages of a keyed server, and POSTs that are not declared JSON (a browser page's
text/plain); and from issue 31, a client that hangs up in the middle of its body (one log line),
``HEAD /health``, and a refused ``max_completion_tokens`` named as sent. The load part is
``benchmarks/serve_load.py``."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import httpx
import pytest
from transformers import AutoTokenizer

from segmask.segments import encode_chat
from segmask.serving import ServeConfig
from segmask.serving.protocol import UNSUPPORTED

from .live_server import NAME, live

GOOD = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
STORY = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def strict(model, stories_tokenizer):
    """Small limits, so that each is easy to reach."""
    with live(model, stories_tokenizer, max_messages=2, max_prompt_chars=300, max_prompt_tokens=40) as server:
        yield server


def health_answers(server, within: float = 1.0) -> None:
    started = time.monotonic()
    response = httpx.get(server.url + "/health", timeout=within + 5)
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert time.monotonic() - started < within, "/health was slow"


def post(server, path: str, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(server.url + path, content=body, headers=headers, timeout=60)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, param: str | None, code: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    return error


# ------------------------------------------------------------------------------------------ bad requests

UNSUPPORTED_VALUES = {
    "n": 2,
    "best_of": 3,
    "logprobs": True,
    "top_logprobs": 2,
    "logit_bias": {"5": 10.0},
    "presence_penalty": 0.5,
    "frequency_penalty": -1.0,
    "echo": True,
    "suffix": "The end.",
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "response_format": {"type": "json_object"},
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "Hi"},
    "reasoning_effort": "low",
    "web_search_options": {},
}


def test_every_unsupported_field_has_a_refused_value_here():
    assert set(UNSUPPORTED_VALUES) == set(UNSUPPORTED)


@pytest.mark.parametrize("path", [CHAT_URL, COMPLETIONS_URL])
@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_an_unsupported_field_is_refused_by_name(server, path, name):
    body = {**(GOOD if path == CHAT_URL else STORY), name: UNSUPPORTED_VALUES[name]}
    error = assert_error(post(server, path, body), 400, name, "unsupported_value")
    assert error["message"].startswith(f"{name} is not supported")
    health_answers(server)


def test_unsupported_fields_at_their_unused_values_are_accepted(server):
    neutral = {"n": 1, "logprobs": False, "tool_choice": "none", "response_format": {"type": "text"}}
    neutral |= {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "tools": []}
    assert post(server, CHAT_URL, {**GOOD, **neutral, "user": "someone"}).status_code == 200
    assert post(server, COMPLETIONS_URL, {**STORY, "echo": False, "best_of": 1}).status_code == 200
    # type for type: true is not 1
    assert_error(post(server, CHAT_URL, {**GOOD, "n": True}), 400, "n", "unsupported_value")


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**40])
def test_a_seed_outside_int64_is_refused(server, seed):
    error = assert_error(
        post(server, CHAT_URL, {**GOOD, "temperature": 1, "seed": seed}), 400, "seed", "invalid_value"
    )
    assert "seed:" in error["message"]
    health_answers(server)
    for edge in (2**63 - 1, -(2**63)):  # the edges are seeds
        assert post(server, CHAT_URL, {**GOOD, "temperature": 1, "seed": edge}).status_code == 200


@pytest.mark.parametrize("temperature", [1e-38, 5e-324, 1e-300])
def test_an_underflowing_temperature_answers_greedily(server, temperature):
    body = {**STORY, "max_tokens": 8}
    greedy = post(server, COMPLETIONS_URL, body)
    tiny = post(server, COMPLETIONS_URL, {**body, "temperature": temperature, "seed": 1})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    health_answers(server)


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain", "Origin": "https://evil.example"},  # a browser's "simple" request
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=x"},
        {},  # none declared
    ],
)
@pytest.mark.parametrize("path", [CHAT_URL, COMPLETIONS_URL])
def test_a_post_not_declared_json_is_refused(server, path, headers):
    import json

    raw = json.dumps(GOOD if path == CHAT_URL else STORY).encode()
    error = assert_error(post(server, path, raw, headers), 415, "Content-Type", "unsupported_media_type")
    assert "application/json" in error["message"]
    health_answers(server)
    declared = {"Content-Type": "application/json; charset=utf-8", "Origin": "https://evil.example"}
    assert post(server, path, raw, declared).status_code == 200  # the preflight is the browser's job


def test_a_browser_preflight_is_not_answered(server):
    preflight = httpx.options(
        server.url + CHAT_URL,
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


# ------------------------------------------------------------------------------------------ limits


def test_each_prompt_limit_is_a_400_naming_it(strict):
    many = [{"role": "user", "content": ""}] * 3
    error = assert_error(
        post(strict, CHAT_URL, {**GOOD, "messages": many}), 400, "messages", "too_many_messages"
    )
    assert "3 messages" in error["message"] and "max_messages" in error["message"]
    assert post(strict, CHAT_URL, {**GOOD, "messages": many[:2]}).status_code == 200

    long = {"role": "user", "content": "a" * 301}
    error = assert_error(
        post(strict, CHAT_URL, {**GOOD, "messages": [long]}), 400, "messages", "context_length_exceeded"
    )
    assert "301 characters" in error["message"] and "max_prompt_chars" in error["message"]
    error = assert_error(
        post(strict, COMPLETIONS_URL, {**STORY, "prompt": "a" * 301}),
        400,
        "prompt",
        "context_length_exceeded",
    )
    assert "max_prompt_chars" in error["message"]

    words = {**STORY, "prompt": "one two three four five six seven eight nine ten eleven twelve " * 4}
    error = assert_error(post(strict, COMPLETIONS_URL, words), 400, "prompt", "context_length_exceeded")
    assert "max_prompt_tokens" in error["message"]
    assert post(strict, COMPLETIONS_URL, {**STORY, "prompt": [1] * 40}).status_code == 200
    assert_error(
        post(strict, COMPLETIONS_URL, {**STORY, "prompt": [1] * 41}), 400, "prompt", "context_length_exceeded"
    )

    # a body larger than the largest acceptable prompt needs is not even parsed
    assert_error(
        post(strict, COMPLETIONS_URL, {**STORY, "prompt": "a" * 2_000_000}), 413, None, "request_too_large"
    )
    health_answers(strict)


# ------------------------------------------------------------------------------------------ the event loop


def test_encoding_is_linear_in_the_conversation(stories_tokenizer):
    """3,000 empty turns took 21 s: the template was rendered once per turn. Now a few renders in all."""
    renders = 0
    tokenizer = AutoTokenizer.from_pretrained(stories_tokenizer.name_or_path)
    tokenizer.chat_template = stories_tokenizer.chat_template
    render = tokenizer.apply_chat_template

    def counted(*args, **kwargs):
        nonlocal renders
        renders += 1
        return render(*args, **kwargs)

    tokenizer.apply_chat_template = counted
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": "ok"}] * 1500
    encoded = encode_chat(tokenizer, turns, policy="mas", add_generation_prompt=True)
    assert renders <= 6
    # the same segments as a short conversation's, turn for turn
    short = encode_chat(stories_tokenizer, turns[:6], policy="mas")
    assert encoded.segment_ids[: len(short.input_ids)] == short.segment_ids
    assert len(set(encoded.segment_ids)) == len(set(short.segment_ids)) + 1497


def test_health_answers_while_a_prompt_is_being_encoded(model, stories_tokenizer):
    """A chat template that takes as long as the test says: encoding must not hold the event loop."""
    tokenizer = AutoTokenizer.from_pretrained(stories_tokenizer.name_or_path)
    tokenizer.chat_template = stories_tokenizer.chat_template
    entered, gate = threading.Event(), threading.Event()
    render = tokenizer.apply_chat_template

    def slow(*args, **kwargs):
        entered.set()
        gate.wait(30)
        return render(*args, **kwargs)

    tokenizer.apply_chat_template = slow
    with live(model, tokenizer) as server:
        answers = []
        request = threading.Thread(target=lambda: answers.append(post(server, CHAT_URL, GOOD)))
        request.start()
        try:
            assert entered.wait(30)
            for _ in range(3):
                health_answers(server)
            assert request.is_alive()  # still encoding
        finally:
            gate.set()
            request.join(30)
    assert answers[0].status_code == 200, answers[0].text


def test_health_answers_while_the_largest_accepted_conversation_is_encoded(server):
    """max_messages turns, each up to the character limit's share: encoded (then refused for its tokens)
    while /health keeps answering within a second; one message more is refused before encoding."""
    limit = ServeConfig().max_messages
    share = server.server.config.app.state.served.max_chars // limit
    turns = [{"role": "user", "content": "a " * (share // 2)}] * limit
    answers = []
    request = threading.Thread(
        target=lambda: answers.append(post(server, CHAT_URL, {**GOOD, "messages": turns}))
    )
    started = time.monotonic()
    request.start()
    while request.is_alive():
        health_answers(server)
        time.sleep(0.05)
    took = time.monotonic() - started
    assert_error(answers[0], 400, "messages", "context_length_exceeded")
    assert took < 30, f"the largest conversation took {took:.1f} s"
    over = [{"role": "user", "content": ""}] * (limit + 1)
    assert_error(post(server, CHAT_URL, {**GOOD, "messages": over}), 400, "messages", "too_many_messages")
    health_answers(server)


# ------------------------------------------------------------------------------------------ auth


def test_a_keyed_server_keeps_its_api_pages_closed(model, stories_tokenizer, server):
    with live(model, stories_tokenizer, api_key="sekret") as keyed:
        for page in ("/docs", "/redoc", "/openapi.json"):
            for headers in ({}, {"Authorization": "Bearer sekret"}):
                response = httpx.get(keyed.url + page, headers=headers)
                assert_error(response, 404, None, None)
        assert post(keyed, CHAT_URL, GOOD, {"Authorization": "Bearer wrong"}).status_code == 401
        assert post(keyed, CHAT_URL, GOOD, {"Authorization": "Bearer sekret"}).status_code == 200
        health_answers(keyed)
    assert httpx.get(server.url + "/openapi.json").status_code == 200  # an open server may show them


# ------------------------------------------------------------------------------------------ issue 31


class Records(logging.Handler):
    """Every log record that reaches it, kept in a list."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log():
    """The records of the server's loggers (INFO and up for segmask's) and of uvicorn's (which propagate
    no further than ``uvicorn``) while the test runs."""
    records, segmask_logger = Records(), logging.getLogger("segmask")
    level, segmask_logger.level = segmask_logger.level, logging.INFO
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        yield records.records
    finally:
        for logger in loggers:
            logger.removeHandler(records)
        segmask_logger.level = level


def raw_exchange(server, request: bytes, wait: float = 0.5) -> bytes:
    """Send ``request`` on a socket of its own, read for ``wait`` seconds, close; what the server sent."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(request)
        connection.settimeout(wait)
        received = b""
        with contextlib.suppress(TimeoutError):
            while chunk := connection.recv(65536):
                received += chunk
    return received


@pytest.mark.parametrize("path", [CHAT_URL, COMPLETIONS_URL])
def test_a_client_that_hangs_up_mid_body_is_one_log_line(server, log, path):
    """Before: a 500 and two tracebacks (ClientDisconnect reached the catch-all handler), ~120 log lines
    for a 100-byte connection."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    raw_exchange(server, head.encode() + b'{"model": "stor', wait=0.2)
    deadline = time.monotonic() + 10
    while not log and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # and nothing more
    assert len(log) == 1, [record.getMessage() for record in log]
    [record] = log
    assert (record.levelno, record.exc_info) == (logging.INFO, None)
    assert "disconnected before sending its whole body" in record.getMessage() and path in record.getMessage()
    health_answers(server)


def test_health_answers_head(server):
    """Liveness probes ask with HEAD: 200 and the headers, no body (before: 405)."""
    assert httpx.head(server.url + "/health").status_code == 200
    answer = raw_exchange(server, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK" and rest.endswith(b"\r\n\r\n") and rest.count(b"\r\n\r\n") == 1


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_a_token_limit_over_the_context_is_refused_by_the_name_sent(server, param):
    error = assert_error(
        post(server, CHAT_URL, {**GOOD, "max_tokens": None, param: 100_000}),
        400,
        param,
        "context_length_exceeded",
    )
    assert error["message"].startswith(f"{param} 100000 + ")
