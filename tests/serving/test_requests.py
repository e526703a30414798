"""Unit tests of :mod:`segmask.serving.requests`: each check and encoding step of a completion request, alone.

No model and no server: a fake ``Served`` (the attributes these functions read), stories260K's tokenizer
where a prompt is encoded, starlette ``Request`` objects over a scripted ``receive``, and a fake engine and
scheduler that record what :func:`submit` hands them. test_app.py and test_hostile.py test the same refusals
end to end through a live server.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from segmask.segments import encode_chat, encode_text, encode_tokens
from segmask.serving.engine import QueueFull, Sampling
from segmask.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest
from segmask.serving.requests import (
    _policy,
    encode_chat_prompt,
    encode_completion_prompt,
    parse_and_encode,
    read_body,
    require_json,
    submit,
)

NAME = "stories"
VOCAB = 512  # stories260K's vocabulary


def fake_served(tokenizer=None, **overrides) -> SimpleNamespace:
    """A stand-in for app.Served with small limits: the attributes requests.py reads, nothing else."""
    config = SimpleNamespace(
        model_name=NAME,
        max_messages=overrides.pop("max_messages", 3),
        retry_after_s=overrides.pop("retry_after_s", 7),
    )
    served = {
        "tokenizer": tokenizer,
        "policy": "mas",
        "config": config,
        "causal_sink": None,
        "max_context": 10,
        "max_chars": 50,
        "max_prompt_tokens": 6,
        "vocab_size": VOCAB,
        "engine": None,
    }
    return SimpleNamespace(**{**served, **overrides})


def refused(call, *args) -> APIError:
    with pytest.raises(APIError) as error:
        call(*args)
    return error.value


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": NAME, **fields})


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": NAME, **fields})


# ----------------------------------------------------------------------------- require_json, read_body


class Receive:
    """A scripted ASGI ``receive``: the body in ``chunks``; counts how often it was awaited."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.calls = list(chunks), 0

    async def __call__(self) -> dict:
        self.calls += 1
        chunk = self.chunks.pop(0) if self.chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}


def request(headers: dict[str, str], receive: Receive | None = None) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive or Receive([]))


@pytest.mark.parametrize(
    "declared", ["application/json", "application/json; charset=utf-8", "Application/JSON ;charset=UTF-8"]
)
def test_require_json_accepts_json(declared):
    assert require_json(request({"Content-Type": declared})) is None


@pytest.mark.parametrize(
    "headers, shown",
    [
        ({"Content-Type": "text/plain"}, "'text/plain'"),
        ({}, "''"),
        ({"Content-Type": "application/jsonp"}, "'application/jsonp'"),
        ({"Content-Type": "x" * 300}, repr("x" * 100)),
    ],
)
def test_require_json_refuses_anything_else_with_415_naming_content_type(headers, shown):
    error = refused(require_json, request(headers))
    assert (error.status, error.param, error.code) == (415, "Content-Type", "unsupported_media_type")
    assert error.message == f"Content-Type must be application/json, got {shown}"


# --------------------------------------------------------------------------------------------- read_body


def read(headers: dict[str, str], receive: Receive, limit: int) -> bytes:
    return asyncio.run(read_body(request(headers, receive), limit))


@pytest.mark.parametrize("declared", [{"Content-Length": "15"}, {"Content-Length": "3"}, {}])
def test_read_body_within_the_limit_is_the_exact_bytes_of_every_chunk(declared):
    receive = Receive([b'{"a":', b" 1, ", b'"b":2}'])
    assert read(declared, receive, limit=15) == b'{"a": 1, "b":2}'
    assert receive.calls == 3


def test_read_body_refuses_a_declared_length_over_the_limit_without_reading():
    receive = Receive([b"x" * 10])
    with pytest.raises(APIError) as error:
        read({"Content-Length": "11"}, receive, limit=10)
    assert (error.value.status, error.value.code, error.value.param) == (413, "request_too_large", None)
    assert "exceeds 10 bytes" in error.value.message
    assert receive.calls == 0


@pytest.mark.parametrize("declared", [{}, {"Content-Length": "4"}, {"Content-Length": "nonsense"}])
def test_read_body_refuses_a_stream_past_the_limit_and_stops_reading(declared):
    receive = Receive([b"aaaa", b"bbbb", b"cccc", b"dddd", b"eeee"])
    with pytest.raises(APIError) as error:
        read(declared, receive, limit=10)
    assert (error.value.status, error.value.code) == (413, "request_too_large")
    assert receive.calls == 3  # the third chunk passes 10 bytes; the last two are never asked for


def test_read_body_at_exactly_the_limit_is_read():
    receive = Receive([b"aaaaa", b"bbbbb"])
    assert read({"Content-Length": "10"}, receive, limit=10) == b"aaaaabbbbb"


# --------------------------------------------------------------------------------------------- parse_and_encode


class RecordingEncode:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, served, body, policy):
        self.calls.append((served, body, policy))
        return "encoded"


@pytest.mark.parametrize(
    "raw, param, code, words",
    [
        (b'{"model": "stories", "prompt": "hi"', None, "invalid_json", "not valid JSON"),
        (
            b'{"model": "stories", "prompt": "hi", "temperature": "hot"}',
            "temperature",
            "invalid_value",
            "temperature: ",
        ),
        (b'{"model": "stories"}', "prompt", "invalid_value", "prompt: Field required"),
        (b'{"model": "stories", "prompt": "hi", "n": 2}', "n", "unsupported_value", "not supported"),
    ],
)
def test_parse_and_encode_refuses_bad_bodies_with_400_before_encoding(raw, param, code, words):
    encode = RecordingEncode()
    error = refused(parse_and_encode, fake_served(), raw, CompletionRequest, encode)
    assert (error.status, error.param, error.code) == (400, param, code)
    assert words in error.message
    assert encode.calls == []


def test_parse_and_encode_refuses_another_model_with_404():
    encode = RecordingEncode()
    raw = b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}'
    error = refused(parse_and_encode, fake_served(), raw, ChatCompletionRequest, encode)
    assert (error.status, error.type, error.param, error.code) == (
        404,
        "not_found_error",
        "model",
        "model_not_found",
    )
    assert error.message == "model 'gpt-9' is not served here; this server serves 'stories'"
    assert encode.calls == []


@pytest.mark.parametrize("sent, policy", [("", "mas"), (', "mask_policy": "causal"', "causal")])
def test_parse_and_encode_uses_the_requests_policy_or_the_servers(sent, policy):
    served, encode = fake_served(), RecordingEncode()
    raw = b'{"model": "stories", "prompt": "hi", "max_tokens": 3' + sent.encode() + b"}"
    body, chosen, encoded = parse_and_encode(served, raw, CompletionRequest, encode)
    assert (type(body), body.prompt, body.max_tokens, chosen, encoded) == (
        CompletionRequest,
        "hi",
        3,
        policy,
        "encoded",
    )
    assert encode.calls == [(served, body, policy)]


def test_policy_prefers_the_request_and_checks_the_model():
    served = fake_served(policy="prefix")
    assert _policy(served, completion(prompt="x")) == "prefix"
    assert _policy(served, completion(prompt="x", mask_policy="causal")) == "causal"
    assert refused(_policy, served, CompletionRequest(model="Stories", prompt="x")).code == "model_not_found"


# --------------------------------------------------------------------------------------------- encode_chat_prompt

CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Tell me a story."},
]


def test_a_chat_without_a_template_is_refused():
    tokenizer = SimpleNamespace(chat_template=None)
    error = refused(encode_chat_prompt, fake_served(tokenizer), chat(messages=CONVERSATION), "mas")
    assert (error.status, error.param, error.code) == (400, "messages", "no_chat_template")
    assert "/v1/completions" in error.message


def test_more_messages_than_max_messages_are_refused(stories_tokenizer):
    served = fake_served(stories_tokenizer, max_messages=2, max_chars=1000)
    assert encode_chat_prompt(served, chat(messages=CONVERSATION), "mas").input_ids  # 2: accepted
    three = chat(messages=[*CONVERSATION, {"role": "assistant", "content": "Once"}])
    error = refused(encode_chat_prompt, served, three, "mas")
    assert (error.status, error.param, error.code) == (400, "messages", "too_many_messages")
    assert error.message == "the request has 3 messages; this server accepts at most 2 (max_messages)"


def test_a_conversation_over_max_prompt_chars_is_refused(stories_tokenizer):
    chars = sum(len(m["content"]) for m in CONVERSATION)  # 24
    assert encode_chat_prompt(
        fake_served(stories_tokenizer, max_chars=chars), chat(messages=CONVERSATION), "mas"
    )
    error = refused(
        encode_chat_prompt,
        fake_served(stories_tokenizer, max_chars=chars - 1),
        chat(messages=CONVERSATION),
        "mas",
    )
    assert (error.status, error.param, error.code) == (400, "messages", "context_length_exceeded")
    assert (
        error.message
        == f"the prompt has {chars} characters; this server accepts at most {chars - 1} (max_prompt_chars)"
    )


@pytest.mark.parametrize("policy", ["mas", "prefix", "causal"])
@pytest.mark.parametrize("sink", [None, True, False])
def test_a_chat_is_encode_chat_with_the_generation_prompt_and_the_servers_sink(
    stories_tokenizer, policy, sink
):
    served = fake_served(stories_tokenizer, causal_sink=sink, max_chars=1000)
    got = encode_chat_prompt(served, chat(messages=CONVERSATION), policy)
    expected = encode_chat(
        stories_tokenizer, CONVERSATION, policy=policy, add_generation_prompt=True, causal_sink=sink
    )
    assert got == expected
    assert stories_tokenizer.decode(got.input_ids).endswith("<|assistant|>\n")


def test_the_servers_sink_changes_a_chat_prompt(stories_tokenizer):
    """So that the test above could fail if the sink were not passed: under mas, on and off differ at token 0."""
    body = chat(messages=CONVERSATION)
    on = encode_chat_prompt(fake_served(stories_tokenizer, causal_sink=True, max_chars=1000), body, "mas")
    off = encode_chat_prompt(fake_served(stories_tokenizer, causal_sink=False, max_chars=1000), body, "mas")
    assert (on.segment_ids[0], off.segment_ids[0]) == (-1, 0)


def test_text_parts_and_empty_content_are_the_messages_text(stories_tokenizer):
    parts = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]
    body = chat(messages=[{"role": "system", "content": None}, {"role": "user", "content": parts}])
    got = encode_chat_prompt(fake_served(stories_tokenizer, max_chars=1000), body, "mas")
    plain = [{"role": "system", "content": ""}, {"role": "user", "content": "Tell me a story."}]
    assert got == encode_chat(stories_tokenizer, plain, policy="mas", add_generation_prompt=True)


def test_a_template_that_encode_chat_refuses_is_a_400(stories_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    tokenizer.chat_template = (
        "{% for m in messages|reverse %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    )
    error = refused(
        encode_chat_prompt, fake_served(tokenizer, max_chars=1000), chat(messages=CONVERSATION), "mas"
    )
    assert (error.status, error.param, error.code) == (400, "messages", "invalid_value")
    assert "out of order" in error.message


# --------------------------------------------------------------------------------------------- encode_completion_prompt


@pytest.mark.parametrize("prompt", [["one", "two"], [[1, 2], [3]]])
def test_more_than_one_prompt_is_refused(prompt):
    error = refused(encode_completion_prompt, fake_served(), completion(prompt=prompt), "mas")
    assert (error.status, error.param, error.code) == (400, "prompt", "unsupported_value")
    assert error.message == "one prompt per request (n=1)"


@pytest.mark.parametrize("prompt", [[], [[]]])
def test_an_empty_token_list_is_refused(prompt):
    error = refused(encode_completion_prompt, fake_served(), completion(prompt=prompt), "mas")
    assert (error.status, error.param, error.code) == (400, "prompt", "invalid_value")
    assert error.message == "prompt must not be empty"


@pytest.mark.parametrize("prompt, bad", [([1, VOCAB, 2], VOCAB), ([[5, -1, 10**6]], -1)])
def test_a_token_id_outside_the_vocabulary_is_refused_by_id(prompt, bad):
    error = refused(encode_completion_prompt, fake_served(), completion(prompt=prompt), "mas")
    assert (error.status, error.param) == (400, "prompt")
    assert error.message == f"token id {bad} is outside the vocabulary [0, {VOCAB})"


def test_a_text_over_max_prompt_chars_is_refused(stories_tokenizer):
    error = refused(
        encode_completion_prompt,
        fake_served(stories_tokenizer, max_chars=5),
        completion(prompt="abcdef"),
        "mas",
    )
    assert (error.status, error.param, error.code) == (400, "prompt", "context_length_exceeded")
    assert "6 characters" in error.message and "at most 5" in error.message


@pytest.mark.parametrize("policy", ["mas", "causal"])
@pytest.mark.parametrize("sink", [None, False])
@pytest.mark.parametrize("prompt", ["Once upon a time", ["Once upon a time"]])
def test_a_text_prompt_is_encode_text(stories_tokenizer, policy, sink, prompt):
    served = fake_served(stories_tokenizer, causal_sink=sink)
    got = encode_completion_prompt(served, completion(prompt=prompt), policy)
    assert got == encode_text(stories_tokenizer, "Once upon a time", policy, causal_sink=sink)
    assert got.input_ids == stories_tokenizer("Once upon a time")["input_ids"]


@pytest.mark.parametrize("policy", ["mas", "prefix", "causal"])
@pytest.mark.parametrize("sink", [None, True, False])
@pytest.mark.parametrize("prompt", [[0, 7, VOCAB - 1], [[0, 7, VOCAB - 1]]])
def test_token_ids_are_encode_tokens(policy, sink, prompt):
    got = encode_completion_prompt(fake_served(causal_sink=sink), completion(prompt=prompt), policy)
    assert got == encode_tokens([0, 7, VOCAB - 1], policy, causal_sink=sink)


# --------------------------------------------------------------------------------------------- submit


class FakeEngine:
    def __init__(self) -> None:
        self.jobs: list[tuple] = []

    def new_job(self, encoded, policy, sampling):
        self.jobs.append((encoded, policy, sampling))
        return SimpleNamespace(number=len(self.jobs))


class FakeScheduler:
    def __init__(self, full: bool = False) -> None:
        self.full, self.submitted = full, []

    def submit(self, job) -> None:
        if self.full:
            raise QueueFull(5)
        self.submitted.append(job)


def tokens(n: int):
    return encode_tokens(list(range(1, n + 1)), "mas")


def submitted(body, prompt_len: int, scheduler=None, param: str = "prompt", **served):
    served = fake_served(engine=FakeEngine(), **served)  # context 10, max_prompt_tokens 6
    scheduler = scheduler or FakeScheduler()
    job = submit(served, scheduler, body, tokens(prompt_len), "mas", param)
    return served, scheduler, job


def submit_refused(body, prompt_len: int, param: str = "prompt", **served) -> APIError:
    with pytest.raises(APIError) as error:
        submitted(body, prompt_len, param=param, **served)
    return error.value


@pytest.mark.parametrize("param", ["prompt", "messages"])
def test_a_prompt_over_max_prompt_tokens_is_refused(param):
    submitted(completion(prompt="x", max_tokens=1), 6)  # 6: accepted
    error = submit_refused(completion(prompt="x", max_tokens=1), 7, param=param)
    assert (error.status, error.param, error.code) == (400, param, "context_length_exceeded")
    assert error.message == "the prompt has 7 tokens; this server accepts at most 6 (max_prompt_tokens)"


@pytest.mark.parametrize("prompt_len", [10, 11])
def test_a_prompt_that_fills_the_context_is_refused(prompt_len):
    error = submit_refused(chat(messages=CONVERSATION), prompt_len, param="messages", max_prompt_tokens=9)
    assert (error.status, error.param, error.code) == (400, "messages", "context_length_exceeded")
    assert error.message == (
        f"the prompt has {prompt_len} tokens; this server's context is 10 tokens (prompt + completion)"
    )


@pytest.mark.parametrize(
    "body, param",
    [
        (completion(prompt="x", max_tokens=5), "max_tokens"),
        (chat(messages=CONVERSATION, max_tokens=5), "max_tokens"),
        (chat(messages=CONVERSATION, max_completion_tokens=5), "max_completion_tokens"),
        (chat(messages=CONVERSATION, max_tokens=1, max_completion_tokens=5), "max_completion_tokens"),
    ],
)
def test_a_token_limit_past_the_context_is_refused_by_the_name_sent(body, param):
    _, scheduler, _ = submitted(body.model_copy(update={param: 4}), 6)  # 6 + 4 = 10: accepted
    assert len(scheduler.submitted) == 1
    error = submit_refused(body, 6)
    assert (error.status, error.param, error.code) == (400, param, "context_length_exceeded")
    assert error.message == f"{param} 5 + 6 prompt tokens exceed the context of 10 tokens"


def test_a_full_queue_is_a_429_with_retry_after():
    with pytest.raises(APIError) as error:
        submitted(
            completion(prompt="x", max_tokens=1), 3, scheduler=FakeScheduler(full=True), retry_after_s=7
        )
    error = error.value
    assert (error.status, error.type, error.code) == (429, "rate_limit_error", "queue_full")
    assert error.headers == {"Retry-After": "7"}
    assert error.message == "the server is busy (5 requests waiting); retry after 7 s"


def test_an_accepted_request_enqueues_a_job_with_its_sampling():
    body = chat(
        messages=CONVERSATION,
        max_completion_tokens=3,
        temperature=0.5,
        top_p=0.9,
        seed=11,
        stop=["x", "", "yz"],
    )
    served = fake_served(engine=FakeEngine())
    scheduler = FakeScheduler()
    encoded = tokens(4)
    job = submit(served, scheduler, body, encoded, "prefix", "messages")
    assert served.engine.jobs == [(encoded, "prefix", Sampling(3, 0.5, 0.9, 11, ("x", "yz")))]
    assert scheduler.submitted == [job] and job.number == 1


@pytest.mark.parametrize(
    "body, context, max_tokens",
    [
        (chat(messages=CONVERSATION), 10, 6),  # no limit: the rest of the context (10 - 4)
        (chat(messages=CONVERSATION), 100, 96),
        (completion(prompt="x"), 100, 16),  # /v1/completions: OpenAI's default of 16
        (completion(prompt="x", max_tokens=2), 10, 2),
    ],
)
def test_the_token_limit_defaults_per_endpoint(body, context, max_tokens):
    served, _, _ = submitted(body, 4, max_context=context)
    (_, _, sampling), *_ = served.engine.jobs
    assert sampling == Sampling(max_tokens, 1.0, 1.0, None, ())
