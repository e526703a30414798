"""The FastAPI app of ``segmask serve``: the handlers, the limits they check, and :func:`serve`.

The handlers run on the event loop: they validate a request (:mod:`segmask.serving.protocol`), encode its
prompt, and hand a job to the scheduler; the model runs on the engine's thread (see the package docstring).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from segmask.generation import (
    encode_prompt,
)
from segmask.masks import MaskPolicy, check_policy
from segmask.segments import IGNORE_INDEX, Encoded, encode_chat
from segmask.serving.engine import Engine, Job, QueueFull, Sampling, Scheduler, supports_row_caches
from segmask.serving.prefix_cache import PrefixCache
from segmask.serving.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    APIError,
    BaseRequest,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
POLL_DISCONNECT_S = 0.25


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ServeConfig:
    """Server limits. ``max_context`` defaults to the model's ``max_position_embeddings``."""

    max_batch: int = 8
    max_context: int | None = None
    max_queue: int = 64
    api_key: str | None = None
    prefix_cache_mb: float = 256.0
    model_name: str = "segmask"
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string (or None for no key)")
        if not self.model_name:
            raise ValueError("model_name must be non-empty")


# --------------------------------------------------------------------------------------------- app


@dataclass(frozen=True)
class Served:
    """What the handlers share: the model's tokenizer and limits, and the scheduler."""

    tokenizer: Any
    policy: MaskPolicy
    config: ServeConfig
    max_context: int
    max_chars: int  # prompts with more characters cannot fit max_context: refused before tokenizing
    vocab_size: int
    scheduler: Scheduler
    prefix_cache: PrefixCache | None
    created: int


def create_app(
    model: torch.nn.Module,
    tokenizer,
    policy: MaskPolicy = "mas",
    config: ServeConfig | None = None,
) -> FastAPI:
    """The FastAPI app serving ``model`` (already :func:`segmask.enable`-d) with mask ``policy`` by default.

    Run it with ``uvicorn.run(app, host="127.0.0.1", port=8000)``; the model runs on one worker thread
    that the app starts and stops with its lifespan.
    """
    config = config or ServeConfig()
    policy = check_policy(policy)
    text_config = model.config.get_text_config(decoder=True)
    limit = int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
    max_context = config.max_context or limit
    if max_context is None:
        raise ValueError("the model config has no max_position_embeddings; pass ServeConfig(max_context=...)")
    if limit is not None and max_context > limit:
        raise ValueError(f"max_context {max_context} exceeds the model's max_position_embeddings {limit}")
    prefix_cache = None
    if config.prefix_cache_mb > 0 and supports_row_caches(model):
        prefix_cache = PrefixCache(model.config, int(config.prefix_cache_mb * 2**20))
    engine = Engine(model, tokenizer, prefix_cache)
    longest_token = max(map(len, tokenizer.get_vocab()), default=1)
    state: dict[str, Served] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler = Scheduler(engine, config.max_batch, config.max_queue)
        scheduler.start()
        state["served"] = Served(
            tokenizer=tokenizer,
            policy=policy,
            config=config,
            max_context=max_context,
            max_chars=2 * max_context * longest_token,
            vocab_size=int(text_config.vocab_size),
            scheduler=scheduler,
            prefix_cache=prefix_cache,
            created=int(time.time()),
        )
        app.state.served = state["served"]
        try:
            yield
        finally:
            await scheduler.stop()

    app = FastAPI(title="segmask", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            APIError(error.status_code, str(error.detail), type=kind).body(),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception):
        logger.exception("unhandled error")
        return JSONResponse(
            APIError(500, "internal server error", type="server_error").body(), status_code=500
        )

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    guarded = [Depends(authorize)]

    @app.get("/health")
    async def health() -> dict:
        served = state["served"]
        cache = served.prefix_cache
        return {
            "status": "ok",
            "queued": len(served.scheduler.waiting),
            "running": len(served.scheduler.running),
            "completed": served.scheduler.completed,
            "cancelled": served.scheduler.cancelled,
            "batches": served.scheduler.batches,
            "generated_tokens": served.scheduler.generated_tokens,
            "prefix_cache": None
            if cache is None
            else {"entries": len(cache), "bytes": cache.nbytes, "hits": cache.hits, "lookups": cache.lookups},
        }

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        served = state["served"]
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": served.created,
                    "owned_by": "segmask",
                    "mask_policy": served.policy,
                    "max_context": served.max_context,
                }
            ],
        }

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        served = state["served"]
        body = await _parse(request, ChatCompletionRequest)
        run_policy = _prepare(served, body)
        if getattr(served.tokenizer, "chat_template", None) is None:
            raise APIError(
                400,
                "this model has no chat template; use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        _check_chars(served, sum(len(m["content"]) for m in messages), "messages")
        try:
            encoded = encode_chat(served.tokenizer, messages, policy=run_policy, add_generation_prompt=True)
        except ValueError as error:
            raise APIError(400, str(error), param="messages", code="invalid_value") from None
        job = _submit(
            served, body, encoded, run_policy, "messages", body.max_completion_tokens or body.max_tokens
        )
        return await _respond(request, served, body, job, chat=True)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        served = state["served"]
        body = await _parse(request, CompletionRequest)
        run_policy = _prepare(served, body)
        encoded = _encode_completion_prompt(served, body.prompt, run_policy)
        job = _submit(
            served, body, encoded, run_policy, "prompt", body.max_tokens or DEFAULT_COMPLETION_TOKENS
        )
        return await _respond(request, served, body, job, chat=False)

    return app


def _check_chars(served: Served, chars: int, param: str) -> None:
    """Refuse a prompt that cannot fit the context whatever its tokens (no token spans more characters)."""
    if chars > served.max_chars:
        raise APIError(
            400,
            f"the prompt has {chars} characters, far more than a context of {served.max_context} tokens holds",
            param=param,
            code="context_length_exceeded",
        )


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    size, chunks = int(declared) if declared.isdigit() else 0, []
    if size <= MAX_BODY_BYTES:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                break
            chunks.append(chunk)
    if size > MAX_BODY_BYTES:
        raise APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large")
    return b"".join(chunks)


async def _parse(request: Request, schema: type[BaseRequest]) -> Any:
    raw = await _read_body(request)
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as error:
        raise validation_error(error) from None
    body.check_supported()
    return body


def _prepare(served: Served, body: BaseRequest) -> MaskPolicy:
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


def _encode_completion_prompt(served: Served, prompt, policy: MaskPolicy) -> Encoded:
    """A completion prompt (text or token ids; one per request) as one segment, like ``segmask generate``."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request (n=1)", param="prompt", code="unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        _check_chars(served, len(prompt), "prompt")
        try:
            return encode_prompt(served.tokenizer, prompt, policy)
        except ValueError as error:
            raise APIError(400, str(error), param="prompt", code="invalid_value") from None
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    bad = [t for t in prompt if not 0 <= t < served.vocab_size]
    if bad:
        raise APIError(
            400, f"token id {bad[0]} is outside the vocabulary [0, {served.vocab_size})", param="prompt"
        )
    segment = -1 if policy == "causal" else 0
    return Encoded(list(prompt), [segment] * len(prompt), [IGNORE_INDEX] * len(prompt))


def _submit(
    served: Served,
    body: BaseRequest,
    encoded: Encoded,
    policy: MaskPolicy,
    prompt_param: str,
    max_tokens: int | None,
) -> Job:
    """Check the lengths against the context and enqueue the job (429 when the queue is full)."""
    prompt_len, context = len(encoded.input_ids), served.max_context
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
            f"max_tokens {max_tokens} + {prompt_len} prompt tokens exceed the context of {context} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    sampling = Sampling(max_tokens, body.temperature, body.top_p, body.seed, body.stops())
    job = served.scheduler.engine.new_job(encoded, policy, sampling)
    try:
        served.scheduler.submit(job)
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


async def _respond(request, served: Served, body: BaseRequest, job: Job, chat: bool):
    header = {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": served.config.model_name,
        "mask_policy": job.policy,
    }
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream(served.scheduler, job, header, chat, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    pieces: list[str] = []
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), POLL_DISCONNECT_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                served.scheduler.withdraw(job)
                return Response(status_code=499)
            continue
        if kind == "text":
            pieces.append(value)
        elif kind == "error":
            raise APIError(500, value, type="server_error")
        else:
            break
    text, reason = "".join(pieces), _finish_reason(value)
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return JSONResponse({**header, "choices": [choice], "usage": job.usage()})


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _stream(
    scheduler: Scheduler, job: Job, header: dict, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    header = {**header, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(text: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta = (
                {"role": "assistant", "content": ""}
                if role
                else ({"content": text} if text is not None else {})
            )
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return _event({**header, "choices": [choice]})

    completed = False
    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield chunk(value, None)
            elif kind == "error":
                yield _event(APIError(500, value, type="server_error").body())
                break
            else:
                yield chunk(None, _finish_reason(value))
                if include_usage:
                    yield _event({**header, "choices": [], "usage": job.usage()})
                break
        completed = True
        yield "data: [DONE]\n\n"
    finally:
        if not completed:  # the client left (the response was cancelled): free its place or its row
            scheduler.withdraw(job)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------------------------- serve


def default_name(model_path: str | Path) -> str:
    """The served model name for a path: a folder's name, or a ``.gguf`` file's stem."""
    path = Path(model_path)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def serve(
    model_path: str | Path,
    policy: MaskPolicy | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
    attn_implementation: str | None = None,
) -> None:
    """Load a model (see :func:`segmask.load_model`) and serve it until interrupted."""
    import uvicorn

    from segmask.loading import load_model

    config = config or ServeConfig(model_name=default_name(model_path))
    if host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach it can use the model", host)
    model, tokenizer, policy = load_model(model_path, policy=policy, attn_implementation=attn_implementation)
    app = create_app(model, tokenizer, policy, config)
    uvicorn.run(app, host=host, port=port, log_level="info")
