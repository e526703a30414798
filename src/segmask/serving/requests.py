"""A completion request, from its body to an enqueued job: the checks and the encoding it passes.

:func:`require_json` and :func:`read_body` run on the event loop (the Content-Type, the body's size);
:func:`parse_and_encode` runs on a worker thread, since a chat template may take long: it parses the body
(:mod:`segmask.serving.protocol`), checks the model name and the prompt limits (max_messages,
max_prompt_chars) and encodes the prompt with its mask policy (and the server's ``causal_sink``).
:func:`submit` checks the token lengths against max_prompt_tokens and the context and enqueues the job (429
when the queue is full). Each refusal is an :class:`~segmask.serving.protocol.APIError` naming what was
refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from pydantic import ValidationError

from segmask.policies import MaskPolicy
from segmask.segments import Encoded, encode_chat, encode_text, encode_tokens
from segmask.serving.engine import Job, QueueFull, Sampling, Scheduler
from segmask.serving.protocol import (
    APIError,
    BaseRequest,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)

if TYPE_CHECKING:  # the app holds a Served and calls these; they only read it
    from segmask.serving.app import Served


def require_json(request: Request) -> None:
    """Refuse a body that is not declared JSON: a browser page can send text/plain to localhost unasked, but
    application/json needs a CORS preflight, which this server does not answer."""
    declared = request.headers.get("content-type", "")
    if declared.partition(";")[0].strip().lower() != "application/json":
        raise APIError(
            415,
            f"Content-Type must be application/json, got {declared[:100]!r}",
            param="Content-Type",
            code="unsupported_media_type",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body; 413 if its declared or its read length passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    size, chunks = int(declared) if declared.isdigit() else 0, []
    if size <= limit:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
    if size > limit:
        raise APIError(
            413,
            f"the request body exceeds {limit} bytes, more than this server's largest prompt needs",
            code="request_too_large",
        )
    return b"".join(chunks)


def parse_and_encode(
    served: Served,
    raw: bytes,
    schema: type[BaseRequest],
    encode: Callable[[Served, Any, MaskPolicy], Encoded],
) -> tuple[Any, MaskPolicy, Encoded]:
    """The checked request, its mask policy and its encoded prompt (on a worker thread: this may take long)."""
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as error:
        raise validation_error(error) from None
    body.check_supported()
    policy = _policy(served, body)
    return body, policy, encode(served, body, policy)


def _policy(served: Served, body: BaseRequest) -> MaskPolicy:
    """Check the requested model name; the mask policy the request runs with."""
    if body.model != served.config.model_name:
        raise APIError(
            404,
            f"model {body.model!r} is not served here; this server serves {served.config.model_name!r}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
    return body.mask_policy or served.policy


def encode_chat_prompt(served: Served, body: ChatCompletionRequest, policy: MaskPolicy) -> Encoded:
    """A chat request's messages with the chat template and the assistant header (400 without a template)."""
    if getattr(served.tokenizer, "chat_template", None) is None:
        raise APIError(
            400,
            "this model has no chat template; use /v1/completions",
            param="messages",
            code="no_chat_template",
        )
    limit = served.config.max_messages
    if len(body.messages) > limit:
        raise APIError(
            400,
            f"the request has {len(body.messages)} messages; this server accepts at most {limit} (max_messages)",
            param="messages",
            code="too_many_messages",
        )
    conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
    _check_chars(served, sum(len(m["content"]) for m in conversation), "messages")
    try:
        return encode_chat(
            served.tokenizer,
            conversation,
            policy=policy,
            add_generation_prompt=True,
            causal_sink=served.causal_sink,
        )
    except ValueError as error:
        raise APIError(400, str(error), param="messages", code="invalid_value") from None


def encode_completion_prompt(served: Served, body: CompletionRequest, policy: MaskPolicy) -> Encoded:
    """A completion prompt (text or token ids; one per request) as raw text: one segment unless causal."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request (n=1)", param="prompt", code="unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        _check_chars(served, len(prompt), "prompt")
        try:
            return encode_text(served.tokenizer, prompt, policy, causal_sink=served.causal_sink)
        except ValueError as error:
            raise APIError(400, str(error), param="prompt", code="invalid_value") from None
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    bad = [t for t in prompt if not 0 <= t < served.vocab_size]
    if bad:
        raise APIError(
            400, f"token id {bad[0]} is outside the vocabulary [0, {served.vocab_size})", param="prompt"
        )
    return encode_tokens(prompt, policy, causal_sink=served.causal_sink)


def _check_chars(served: Served, chars: int, param: str) -> None:
    """Refuse a prompt over max_prompt_chars, or one that cannot fit the context whatever its tokens."""
    if chars > served.max_chars:
        raise APIError(
            400,
            f"the prompt has {chars} characters; this server accepts at most {served.max_chars} "
            "(max_prompt_chars)",
            param=param,
            code="context_length_exceeded",
        )


def submit(
    served: Served,
    scheduler: Scheduler,
    body: BaseRequest,
    encoded: Encoded,
    policy: MaskPolicy,
    prompt_param: str,
) -> Job:
    """Check the lengths against the limits and the context, and enqueue the job (429 when the queue is full)."""
    prompt_len, context = len(encoded.input_ids), served.max_context
    max_tokens, max_tokens_param = body.token_limit()
    if served.max_prompt_tokens < prompt_len < context:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens; this server accepts at most {served.max_prompt_tokens} "
            "(max_prompt_tokens)",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if prompt_len >= context:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens; this server's context is {context} tokens (prompt + completion)",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = context - prompt_len
    elif prompt_len + max_tokens > context:
        raise APIError(
            400,
            f"{max_tokens_param} {max_tokens} + {prompt_len} prompt tokens exceed the context of {context} "
            "tokens",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    sampling = Sampling(max_tokens, body.temperature, body.top_p, body.seed, body.stops())
    job = served.engine.new_job(encoded, policy, sampling)
    try:
        scheduler.submit(job)
    except QueueFull as full:
        retry = served.config.retry_after_s
        raise APIError(
            429,
            f"the server is busy ({full.waiting} requests waiting); retry after {retry} s",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(retry)},
        ) from None
    return job
