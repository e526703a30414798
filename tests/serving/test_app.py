"""The OpenAI-compatible server, driven by the official ``openai`` client against live uvicorn servers on
loopback: greedy outputs equal :func:`segmask.generation.generate`, streaming equals non-streaming, bad
input gets OpenAI-style 4xx bodies, the API key, the prefix cache (cached tokens, same text), batching,
the bounded queue (429), client disconnects, and a bounded load test printing p50/p99 latency."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
from transformers import AutoModelForCausalLM

import segmask
from segmask.generation import generate
from segmask.segments import encode_chat
from segmask.serving import ServeConfig

from .live_server import NAME, live

SYSTEM = {"role": "system", "content": "You tell short stories."}
CAT = [SYSTEM, {"role": "user", "content": "Tell me about a cat."}]
STORY = "Once upon a time, there was a little dog named"


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uncached(model, tokenizer):
    with live(model, tokenizer, prefix_cache_mb=0) as server:
        yield server


@pytest.fixture
def fresh(model, tokenizer):
    """A live server of its own (the default ServeConfig), whose prefix cache starts empty."""
    with live(model, tokenizer) as server:
        yield server


@pytest.fixture
def gated(stories_path, tokenizer):
    """A model whose every forward waits for ``gate``: a generation that runs exactly as long as the test says."""
    gate = threading.Event()
    model = segmask.enable(AutoModelForCausalLM.from_pretrained(stories_path).eval())
    model.register_forward_pre_hook(lambda module, args: gate.wait(30) and None)

    @contextmanager
    def start(**config):
        try:
            with live(model, tokenizer, **config) as server:
                yield server, gate
        finally:
            gate.set()

    return start


def reference(model, tokenizer, prompt, max_tokens: int, policy: str = "mas"):
    [completion] = generate(
        model, tokenizer, [prompt], policy=policy, max_new_tokens=max_tokens, do_sample=False
    )
    return completion


# ------------------------------------------------------------------------------------------ greedy = generate


def test_chat_and_completion_greedy_equal_generate_streaming_or_not(server, model, tokenizer):
    client = server.client()
    expected = reference(model, tokenizer, CAT, 24)
    prompt_tokens = len(encode_chat(tokenizer, CAT, policy="mas", add_generation_prompt=True).input_ids)

    reply = client.chat.completions.create(model=NAME, messages=CAT, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("stop" if expected.token_ids[-1] == 2 else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        prompt_tokens,
        len(expected.token_ids),
    )
    assert reply.model == NAME and reply.model_extra["mask_policy"] == "mas"

    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=CAT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(c.model_extra["mask_policy"] == "mas" for c in chunks)

    story = reference(model, tokenizer, STORY, 20)
    completion = client.completions.create(model=NAME, prompt=STORY, max_tokens=20, temperature=0)
    assert completion.choices[0].text == story.text and completion.usage.completion_tokens == len(
        story.token_ids
    )
    streamed = client.completions.create(model=NAME, prompt=STORY, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == story.text
    ids = tokenizer(STORY)["input_ids"]
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=20, temperature=0)
    assert by_ids.choices[0].text == story.text
    for policy in ("mas", "causal"):  # a one-token prompt (BOS): nothing to prefill or cache
        bos_only = client.completions.create(
            model=NAME, prompt="", max_tokens=6, temperature=0, extra_body={"mask_policy": policy}
        )
        assert bos_only.usage.prompt_tokens == 1
        assert bos_only.choices[0].text == reference(model, tokenizer, "", 6, policy=policy).text


def test_request_mask_policy_is_used_and_echoed(server, model, tokenizer):
    client = server.client()
    for policy in ("causal", "prefix"):
        expected = reference(model, tokenizer, CAT, 16, policy=policy)
        reply = client.chat.completions.create(
            model=NAME, messages=CAT, max_tokens=16, temperature=0, extra_body={"mask_policy": policy}
        )
        assert reply.model_extra["mask_policy"] == policy
        assert reply.choices[0].message.content == expected.text
    story_causal = reference(model, tokenizer, STORY, 12, policy="causal")
    story_mas = reference(model, tokenizer, STORY, 12, policy="mas")
    assert (
        story_causal.text != story_mas.text
    )  # the mask matters for this prompt, so the check below can fail
    reply = client.completions.create(
        model=NAME, prompt=STORY, max_tokens=12, temperature=0, extra_body={"mask_policy": "causal"}
    )
    assert reply.choices[0].text == story_causal.text


def test_stop_strings_max_tokens_and_seeded_sampling(server, model, tokenizer):
    client = server.client()
    expected = reference(model, tokenizer, STORY, 30)
    stop = expected.text[len(expected.text) // 2 :][:4]
    cut = expected.text[: expected.text.find(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(
                client.completions.create(
                    model=NAME, prompt=STORY, max_tokens=30, temperature=0, stop=[stop], stream=True
                )
            )
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            reply = client.completions.create(
                model=NAME, prompt=STORY, max_tokens=30, temperature=0, stop=stop
            )
            text, reason = reply.choices[0].text, reply.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")

    short = client.completions.create(model=NAME, prompt=STORY, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].text == tokenizer.decode(expected.token_ids[:3], skip_special_tokens=True)

    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=NAME, messages=CAT, max_tokens=16, temperature=1.0, top_p=0.95, seed=seed
        )
        return reply.choices[0].message.content

    assert sample(7) == sample(7)


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert (
        models.data[0].model_extra["mask_policy"] == "mas"
        and models.data[0].model_extra["max_context"] == 512
    )
    health = server.health()
    assert health["status"] == "ok" and health["queued"] == 0 and health["prefix_cache"] is not None


# ------------------------------------------------------------------------------------------ multi-byte text

PROMPT_IDS = [1, 307, 347]  # "<s> Loo"


@pytest.fixture(scope="module")
def scripted(stories_path, tokenizer):
    """A live server whose model generates the tokens of ``script`` (a list the test fills) after PROMPT_IDS:
    each decoding step's logits are overwritten to pick the script's next token."""
    script: list[int] = []
    model = segmask.enable(AutoModelForCausalLM.from_pretrained(stories_path).eval())

    def force(module, args, kwargs, output):
        if kwargs.get("segment_ids") is not None:  # the prompt's prefill
            return
        step = int(kwargs["position_ids"][0, -1]) + 1 - len(PROMPT_IDS)  # tokens generated so far
        output.logits[:, -1, :] = -1e4
        output.logits[:, -1, script[min(step, len(script) - 1)]] = 1e4

    model.register_forward_hook(force, with_kwargs=True)
    with live(model, tokenizer) as server:
        yield server, script


@pytest.mark.parametrize(
    "text",
    ["Look 😀 at the 猫 now", "猫猫😀😀 end", "é ñ 日本語 🙂👍🏽\nok"],
)
def test_emoji_and_cjk_of_a_byte_fallback_tokenizer_arrive_whole(scripted, tokenizer, text):
    """stories260K spells these characters in byte tokens (one per UTF-8 byte). Before, the client received
    ``'Look ��at the � now'`` for the first, streaming or not."""
    server, script = scripted
    script[:] = tokenizer(text, add_special_tokens=False).input_ids
    assert {3 + 0xF0, 3 + 0xE7} & set(script)  # <0xF0> or <0xE7>: byte tokens
    expected = tokenizer.decode(script, skip_special_tokens=True)
    assert expected == text
    client = server.client()
    args = {"model": NAME, "prompt": PROMPT_IDS, "max_tokens": len(script), "temperature": 0}
    reply = client.completions.create(**args)
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "length"
    pieces = [chunk.choices[0].text for chunk in client.completions.create(stream=True, **args)]
    assert "".join(pieces) == expected and not any("\ufffd" in piece for piece in pieces)


# ------------------------------------------------------------------------------------------ bad input


GOOD = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
LONG = "one two three four five six seven eight nine ten " * 60


@pytest.mark.parametrize(
    "path, body, status, param, code",
    [
        ("chat", b'{"model": "stories", "messages": [', 400, None, "invalid_json"),
        ("chat", b"[]", 400, None, "invalid_value"),
        ("chat", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens", "invalid_value"),
        ("chat", {**GOOD, "temperature": "hot"}, 400, "temperature", "invalid_value"),
        ("chat", {**GOOD, "messages": "Hi"}, 400, "messages", "invalid_value"),
        ("chat", {**GOOD, "stream": "yes"}, 400, "stream", "invalid_value"),
        (
            "chat",
            {**GOOD, "messages": [{"role": "wizard", "content": "Hi"}]},
            400,
            "messages.0.role",
            "invalid_value",
        ),
        (
            "chat",
            {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages.0.content",
            "invalid_value",
        ),
        ("chat", {**GOOD, "messages": []}, 400, "messages", "invalid_value"),
        ("chat", {"model": NAME}, 400, "messages", "invalid_value"),
        ("chat", {**GOOD, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ("chat", {**GOOD, "max_tokens": 100_000}, 400, "max_tokens", "context_length_exceeded"),
        (
            "chat",
            {**GOOD, "messages": [{"role": "user", "content": LONG}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
        ("chat", {**GOOD, "temperature": 3}, 400, "temperature", "invalid_value"),
        ("chat", {**GOOD, "n": 2}, 400, "n", "unsupported_value"),
        ("chat", {**GOOD, "mask_policy": "sideways"}, 400, "mask_policy", "invalid_value"),
        ("chat", {**GOOD, "model": "gpt-9"}, 404, "model", "model_not_found"),
        ("completions", {"model": NAME, "prompt": [1, 99999]}, 400, "prompt", None),
        ("completions", {"model": NAME, "prompt": LONG}, 400, "prompt", "context_length_exceeded"),
        ("completions", {"model": NAME, "prompt": ["a", "b"]}, 400, "prompt", "unsupported_value"),
        (
            "completions",
            {"model": NAME, "prompt": "word " * 50_000},
            400,
            "prompt",
            "context_length_exceeded",
        ),
        ("completions", b'{"prompt": "' + b"a" * (17 << 20) + b'"}', 413, None, "request_too_large"),
    ],
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, path, body, status, param, code):
    url = f"{server.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}"
    kwargs = (
        {"content": body, "headers": {"Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    response = httpx.post(url, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert httpx.post(f"{server.url}/v1/chat/completions", json=GOOD, timeout=30).status_code == 200


def test_bad_input_through_the_openai_client_and_unknown_routes(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=NAME, messages=[{"role": "wizard", "content": "Hi"}])
    assert error.value.status_code == 400 and error.value.param == "messages.0.role"
    assert "unknown role 'wizard'" in error.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=CAT)
    response = httpx.get(server.url + "/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_api_key_and_max_context(model, tokenizer):
    with live(model, tokenizer, api_key="sekret", max_context=80) as server:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").chat.completions.create(model=NAME, messages=CAT, max_tokens=2)
        bare = httpx.post(server.url + "/v1/chat/completions", json=GOOD)
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert bare.headers["www-authenticate"] == "Bearer"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200  # liveness stays open

        client = server.client(api_key="sekret")
        assert (
            client.chat.completions.create(
                model=NAME, messages=CAT, max_tokens=2, temperature=0
            ).usage.completion_tokens
            == 2
        )
        prompt_tokens = len(encode_chat(tokenizer, CAT, policy="mas", add_generation_prompt=True).input_ids)
        assert client.models.list().data[0].model_extra["max_context"] == 80
        with pytest.raises(openai.BadRequestError) as error:  # fits the model's 512, not --max-context 80
            client.chat.completions.create(model=NAME, messages=CAT, max_tokens=80 - prompt_tokens + 1)
        assert error.value.code == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(
                model=NAME, messages=[SYSTEM, {"role": "user", "content": LONG[:200]}]
            )
        assert (error.value.code, error.value.param) == ("context_length_exceeded", "messages")
        # without max_tokens a chat may use the rest of the context
        reply = client.chat.completions.create(model=NAME, messages=CAT, temperature=0)
        assert reply.usage.total_tokens <= 80


# ------------------------------------------------------------------------------------------ prefix cache


@pytest.mark.exactness
def test_prefix_cache_reports_cached_tokens_and_keeps_the_text(fresh, uncached, model, tokenizer):
    server = fresh  # its own server: an empty cache, so every count is exact
    system = {"role": "system", "content": "You tell short stories about the sea."}
    first = [system, {"role": "user", "content": "Tell me about a fish."}]
    second = [system, {"role": "user", "content": "Tell me about a boat."}]
    segments = encode_chat(tokenizer, second, policy="mas", add_generation_prompt=True).segment_ids
    client, plain = server.client(), uncached.client()

    def ask(c, messages, **options):
        return c.chat.completions.create(
            model=NAME, messages=messages, max_tokens=16, temperature=0, **options
        )

    reply = ask(client, first)
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # nothing before it
    # the BOS is causal under mas (the sink), so a second prompt shares it and its whole system segment
    assert segments[0] == -1 and segments[1] == 0
    again = ask(client, second)
    assert again.usage.prompt_tokens_details.cached_tokens == segments.index(1)  # the whole system segment
    assert again.choices[0].message.content == ask(plain, second).choices[0].message.content
    assert again.choices[0].message.content == reference(model, tokenizer, second, 16).text

    # a follow-up turn reuses the whole earlier conversation (its segments are whole)
    follow_up = first + [
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    first_segments = encode_chat(tokenizer, first, policy="mas", add_generation_prompt=True).segment_ids
    chunks = list(ask(client, follow_up, stream=True, stream_options={"include_usage": True}))
    cached = chunks[-1].usage.prompt_tokens_details.cached_tokens
    assert cached >= len(first_segments) - first_segments[::-1].index(
        1
    )  # past the end of the first user turn
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ask(plain, follow_up).choices[0].message.content
    assert ask(plain, follow_up).usage.prompt_tokens_details.cached_tokens == 0

    # prefix: one segment spans the prompt, nothing is reused
    for _ in range(2):
        reply = ask(client, second, extra_body={"mask_policy": "prefix"})
        assert reply.usage.prompt_tokens_details.cached_tokens == 0


# ------------------------------------------------------------------------------------------ causal sink


def test_greedy_requests_with_the_causal_sink_equal_generate_cold_and_warm(model, tokenizer):
    """ServeConfig(causal_sink=True): a greedy chat request returns generate(..., causal_sink=True)'s tokens
    with the prefix cache cold and warm (the sink and the system segment reused, then the whole prompt);
    completions of text or of token ids too."""
    system = {"role": "system", "content": "You tell short stories."}
    first = [system, {"role": "user", "content": "A cat?"}]
    second = [system, {"role": "user", "content": "Tell me about a boat."}]
    park = "Lily and Tom went to the park"
    segments = encode_chat(
        tokenizer, second, policy="mas", add_generation_prompt=True, causal_sink=True
    ).segment_ids
    assert segments[:2] == [-1, 0]  # the BOS is the sink

    def expected(prompt, max_tokens, causal_sink=True):
        [completion] = generate(
            model, tokenizer, [prompt], policy="mas", causal_sink=causal_sink, max_new_tokens=max_tokens,
            do_sample=False,
        )  # fmt: skip
        return completion

    for prompt in (first, second, park):  # the sink changes these greedy tokens, so the checks below can fail
        assert expected(prompt, 16).token_ids != expected(prompt, 16, causal_sink=False).token_ids
    with live(model, tokenizer, causal_sink=True) as server:
        client = server.client()

        def ask(messages):
            return client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)

        for messages, cached in [(first, 0), (second, segments.index(1)), (second, len(segments) - 1)]:
            reply = ask(messages)
            want = expected(messages, 16)
            assert reply.usage.prompt_tokens_details.cached_tokens == cached
            assert reply.choices[0].message.content == want.text
            assert reply.usage.completion_tokens == len(want.token_ids)
        story = expected(park, 16)
        for prompt in (park, tokenizer(park)["input_ids"]):
            completion = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
            assert completion.choices[0].text == story.text


def test_serve_resolves_the_causal_sink_from_the_models_run(stories_path, tmp_path, monkeypatch):
    import json
    import shutil

    import segmask.serving.app as app_module

    run = tmp_path / "run"
    shutil.copytree(stories_path, run)
    info = {"policy": "mas", "base_model": str(stories_path), "adapter": False, "causal_sink": True}
    (run / "segmask.json").write_text(json.dumps(info))
    seen = []
    monkeypatch.setattr(app_module.uvicorn, "run", lambda app, **_: seen.append(app.state.served.causal_sink))
    # no run: None stays, each request's policy default (segmask.policies.sink_on)
    for path, requested, sink in [(stories_path, None, None), (run, None, True), (stories_path, True, True)]:
        app_module.serve(path, config=ServeConfig(model_name=NAME, causal_sink=requested))
        assert seen.pop() is sink, (path, requested)
    with pytest.warns(UserWarning, match="trained with causal_sink=True"):
        app_module.serve(run, config=ServeConfig(model_name=NAME, causal_sink=False))
    assert seen.pop() is False
    with pytest.raises(ValueError, match="causal_sink must be true, false or None"):
        ServeConfig(causal_sink="on")


# ------------------------------------------------------------------------------------------ concurrency


def test_requests_waiting_together_run_as_one_batch_with_unbatched_outputs(gated, model, tokenizer):
    prompts = [
        ("chat", CAT, "mas"),
        ("chat", [{"role": "user", "content": "Lily had a red ball."}], "mas"),
        ("chat", CAT, "causal"),
        ("completion", STORY, "mas"),
    ]
    with gated(max_batch=4) as (server, gate):
        client = server.async_client()

        async def ask(kind, prompt, policy):
            options = dict(model=NAME, max_tokens=10, temperature=0, extra_body={"mask_policy": policy})
            if kind == "chat":
                return (
                    (await client.chat.completions.create(messages=prompt, **options))
                    .choices[0]
                    .message.content
                )
            return (await client.completions.create(prompt=prompt, **options)).choices[0].text

        async def main():
            blocker = asyncio.create_task(ask("completion", "Hi", "mas"))
            await asyncio.to_thread(wait_until, lambda: server.health()["running"] == 1)
            waiting = [asyncio.create_task(ask(*p)) for p in prompts]
            await asyncio.to_thread(wait_until, lambda: server.health()["queued"] == len(prompts))
            gate.set()
            return await asyncio.gather(blocker, *waiting)

        _, *texts = asyncio.run(main())
        wait_until(lambda: server.health()["running"] == 0)
        health = server.health()

        # each alone again, now with the prefix cache warm (the batch stored the prompts' leading segments)
        plain = server.client()
        warm, cached = [], []
        for kind, prompt, policy in prompts:
            options = dict(model=NAME, max_tokens=10, temperature=0, extra_body={"mask_policy": policy})
            if kind == "chat":
                reply = plain.chat.completions.create(messages=prompt, **options)
                warm.append(reply.choices[0].message.content)
            else:
                reply = plain.completions.create(prompt=prompt, **options)
                warm.append(reply.choices[0].text)
            cached.append(reply.usage.prompt_tokens_details.cached_tokens)
    assert (health["batches"], health["completed"]) == (2, 5)
    # greedy answers are the same alone (generate), in a concurrent batch, and with the prefix cache warm
    assert texts == [reference(model, tokenizer, prompt, 10, policy).text for _, prompt, policy in prompts]
    assert warm == texts and cached[0] > 0 and cached[1] > 0


def test_full_queue_429_disconnects_free_their_place_and_health_answers(gated, model, tokenizer):
    with gated(max_batch=1, max_queue=1, retry_after_s=2) as (server, gate):
        url = server.url + "/v1/completions"
        request = {"model": NAME, "prompt": STORY, "max_tokens": 200, "temperature": 0, "stream": True}

        async def main():
            async with httpx.AsyncClient(timeout=30) as http:
                running = http.stream("POST", url, json=request)
                first = await running.__aenter__()  # headers are sent when the job is queued
                await asyncio.to_thread(wait_until, lambda: server.health()["running"] == 1)
                started = time.monotonic()
                health = await http.get(server.url + "/health")  # the model thread is busy, the loop is not
                assert health.json()["running"] == 1 and time.monotonic() - started < 2

                waiting = http.stream("POST", url, json=request)
                await waiting.__aenter__()
                assert (await http.get(server.url + "/health")).json()["queued"] == 1
                with pytest.raises(openai.RateLimitError) as error:
                    await server.async_client().completions.create(model=NAME, prompt="Hi", max_tokens=2)
                assert error.value.response.headers["retry-after"] == "2"
                assert error.value.code == "queue_full"

                await waiting.__aexit__(None, None, None)  # the waiting client leaves: its place is free
                await asyncio.to_thread(wait_until, lambda: server.health()["queued"] == 0)
                with pytest.raises(httpx.ReadTimeout):  # so does one that gives up on a non-streamed reply
                    await http.post(url, json={**request, "stream": False}, timeout=0.5)
                await asyncio.to_thread(wait_until, lambda: server.health()["cancelled"] == 2)
                assert server.health()["queued"] == 0
                last = asyncio.create_task(
                    server.async_client().completions.create(
                        model=NAME, prompt=STORY, max_tokens=5, temperature=0
                    )
                )
                await asyncio.to_thread(wait_until, lambda: server.health()["queued"] == 1)

                assert first.status_code == 200
                await running.__aexit__(None, None, None)  # the running client leaves: its row stops
                await asyncio.to_thread(wait_until, lambda: server.health()["cancelled"] == 3)
                gate.set()
                return await last

        reply = asyncio.run(main())
        assert reply.choices[0].text == reference(model, tokenizer, STORY, 5).text
        wait_until(lambda: server.health()["running"] == 0)
        health = server.health()
    # the 200-token request stopped at once: only the last request's tokens were generated; the request
    # that left the queue never ran
    assert health["generated_tokens"] == 5 and health["completed"] == 2


def test_load_200_requests_16_at_a_time(server, tokenizer):
    topics = ["a cat", "a dog", "the sea", "a red ball", "Lily", "the park", "a big tree", "Tom"]
    client = server.async_client()
    latencies: list[float] = []

    async def one(i: int, limit: asyncio.Semaphore) -> int:
        async with limit:
            started = time.monotonic()
            options = dict(model=NAME, max_tokens=8, temperature=0 if i % 3 else 0.8)
            if i % 4 == 3:
                reply = await client.completions.create(
                    prompt=f"Once upon a time, {topics[i % 8]}", **options
                )
                tokens = reply.usage.completion_tokens
            elif i % 2:
                stream = await client.chat.completions.create(
                    messages=[SYSTEM, {"role": "user", "content": f"Tell me about {topics[i % 8]}."}],
                    stream=True,
                    stream_options={"include_usage": True},
                    **options,
                )
                tokens = [chunk async for chunk in stream][-1].usage.completion_tokens
            else:
                reply = await client.chat.completions.create(
                    messages=[SYSTEM, {"role": "user", "content": f"Tell me about {topics[i % 8]}."}],
                    **options,
                )
                tokens = reply.usage.completion_tokens
            latencies.append(time.monotonic() - started)
            return tokens

    async def main():
        limit = asyncio.Semaphore(16)
        return await asyncio.gather(*(one(i, limit) for i in range(200)))

    started = time.monotonic()
    tokens = asyncio.run(main())
    elapsed = time.monotonic() - started
    assert len(tokens) == 200 and all(1 <= t <= 8 for t in tokens)
    ordered = sorted(latencies)
    p50, p99 = statistics.median(ordered), ordered[int(0.99 * len(ordered)) - 1]
    health = server.health()
    print(
        f"\nload: 200 requests, 16 concurrent, max_tokens 8: {elapsed:.1f} s, {200 / elapsed:.1f} req/s, "
        f"{sum(tokens) / elapsed:.0f} tok/s, latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"{health['batches']} batches so far, prefix cache {health['prefix_cache']}"
    )
    assert health["queued"] == 0 and health["running"] == 0
