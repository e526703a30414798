"""The FastAPI app of ``segmask serve``: its routes, its answers, and :func:`serve`.

The handlers run on the event loop and read their state from the app: ``app.state.served`` (fixed when
the app is made: tokenizer, policy, limits, engine) and ``app.state.scheduler`` (made and stopped by the
app's lifespan). A completion handler reads the body (JSON only, bounded in size), then parses and checks
it and encodes the prompt on a worker thread, one request at a time, so that no request's chat template
holds up the event loop (:mod:`segmask.serving.requests`); it submits a job and answers in its endpoint's
:class:`ResponseFormat`, whole or as server-sent events. The model runs on the engine's thread (see
:mod:`segmask.serving.engine`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from segmask.loading import load
from segmask.policies import MaskPolicy, check_policy
from segmask.segments import Encoded
from segmask.serving.config import ServeConfig
from segmask.serving.engine import Engine, Job, Scheduler, supports_row_caches
from segmask.serving.prefix_cache import PrefixCache
from segmask.serving.protocol import (
    CHAT,
    COMPLETION,
    APIError,
    BaseRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
    event,
    finish_reason,
    usage,
)
from segmask.serving.requests import (
    encode_chat_prompt,
    encode_completion_prompt,
    parse_and_encode,
    read_body,
    require_json,
    submit,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20  # no body is read past this; a smaller app limit follows from its ServeConfig
POLL_DISCONNECT_S = 0.25


# --------------------------------------------------------------------------------------------- config


# --------------------------------------------------------------------------------------------- app


@dataclass(frozen=True)
class Served:
    """What the handlers share, fixed when the app is made: the tokenizer, the policy, the limits, the engine."""

    tokenizer: Any
    policy: MaskPolicy
    config: ServeConfig
    max_context: int
    max_chars: int  # max_prompt_chars, at most what max_context can hold: refused before tokenizing
    max_prompt_tokens: int  # max_prompt_tokens, at most max_context - 1
    max_body: int  # bytes of a request body: room for max_chars escaped characters and max_messages messages
    vocab_size: int
    engine: Engine
    created: int

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.engine.prefix_cache

    @property
    def causal_sink(self) -> bool | None:
        """Whether every prompt keeps token 0 causal (``ServeConfig.causal_sink``; ``None``: the default of
        each request's policy, :func:`segmask.policies.sink_on`)."""
        return self.config.causal_sink


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
    max_context = context_limit(model, config)
    prefix_cache = None
    if config.prefix_cache_mb > 0 and supports_row_caches(model):
        prefix_cache = PrefixCache(model.config, int(config.prefix_cache_mb * 2**20))
    longest_token = max(map(len, tokenizer.get_vocab()), default=1)
    fits = 2 * max_context * longest_token  # no prompt with more characters fits the context
    max_chars = min(fits, config.max_prompt_chars or fits)
    docs = {} if config.api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="segmask", lifespan=_lifespan, **docs)  # a keyed server shows no open pages
    app.state.served = Served(
        tokenizer=tokenizer,
        policy=policy,
        config=config,
        max_context=max_context,
        max_chars=max_chars,
        max_prompt_tokens=min(max_context - 1, config.max_prompt_tokens or max_context),
        # a JSON-escaped character takes up to 12 bytes (a surrogate pair), a message's keys ~30
        max_body=min(MAX_BODY_BYTES, 12 * max_chars + 512 * config.max_messages + 2**16),
        vocab_size=int(model.config.get_text_config(decoder=True).vocab_size),
        engine=Engine(model, tokenizer, prefix_cache),
        created=int(time.time()),
    )
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_left)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(router)
    return app


def context_limit(model: torch.nn.Module, config: ServeConfig) -> int:
    """Prompt + completion tokens a request may use: ``config.max_context``, else the model's positions."""
    text_config = model.config.get_text_config(decoder=True)
    limit = int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
    max_context = config.max_context or limit
    if max_context is None:
        raise ValueError("the model config has no max_position_embeddings; pass ServeConfig(max_context=...)")
    if limit is not None and max_context > limit:
        raise ValueError(f"max_context {max_context} exceeds the model's max_position_embeddings {limit}")
    return max_context


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Start a scheduler (and its model thread) for each run of the app; stop it at shutdown."""
    config = app.state.served.config
    scheduler = Scheduler(app.state.served.engine, config.max_batch, config.max_queue)
    scheduler.start()
    app.state.scheduler = scheduler
    app.state.encoding = anyio.CapacityLimiter(1)  # one prompt parsed and encoded at a time, off the loop
    try:
        yield
    finally:
        await scheduler.stop()


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(
        APIError(error.status_code, str(error.detail), type=kind).body(),
        status_code=error.status_code,
        headers=getattr(error, "headers", None),
    )


async def _client_left(request: Request, error: ClientDisconnect) -> Response:
    """A client that hung up before sending its whole body: one line, no traceback (499, which nobody reads)."""
    logger.info(
        "%s %r: the client disconnected before sending its whole body", request.method, request.url.path
    )
    return Response(status_code=499)


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)


def authorize(request: Request) -> None:
    """Refuse a request without the server's API key (when it has one) as ``Authorization: Bearer KEY``."""
    key = request.app.state.served.config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401,
            "missing or incorrect API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


# --------------------------------------------------------------------------------------------- routes

router = APIRouter()
guarded = [Depends(authorize)]  # every route but /health, which liveness probes call without a key


@router.head("/health", include_in_schema=False)
async def health_head() -> Response:
    """For liveness probes that ask with HEAD: 200, no body."""
    return Response(status_code=200)


@router.get("/health")
async def health(request: Request) -> dict:
    scheduler: Scheduler = request.app.state.scheduler
    cache = request.app.state.served.prefix_cache
    return {
        "status": "ok",
        "queued": len(scheduler.waiting),
        "running": len(scheduler.running),
        "completed": scheduler.completed,
        "cancelled": scheduler.cancelled,
        "batches": scheduler.batches,
        "generated_tokens": scheduler.generated_tokens,
        "prefix_cache": None
        if cache is None
        else {"entries": len(cache), "bytes": cache.nbytes, "hits": cache.hits, "lookups": cache.lookups},
    }


@router.get("/v1/models", dependencies=guarded)
async def models(request: Request) -> dict:
    served: Served = request.app.state.served
    model = {
        "id": served.config.model_name,
        "object": "model",
        "created": served.created,
        "owned_by": "segmask",
        "mask_policy": served.policy,
        "max_context": served.max_context,
    }
    return {"object": "list", "data": [model]}


@router.post("/v1/chat/completions", dependencies=guarded)
async def chat_completions(request: Request) -> Response:
    return await _complete(request, ChatCompletionRequest, encode_chat_prompt, "messages", CHAT)


@router.post("/v1/completions", dependencies=guarded)
async def completions(request: Request) -> Response:
    return await _complete(request, CompletionRequest, encode_completion_prompt, "prompt", COMPLETION)


async def _complete(
    request: Request,
    schema: type[BaseRequest],
    encode: Callable[[Served, Any, MaskPolicy], Encoded],
    prompt_param: str,
    form: ResponseFormat,
) -> Response:
    """One completion request: read the body; parse, check and encode it off the event loop; enqueue the
    job; answer in ``form``."""
    served: Served = request.app.state.served
    require_json(request)
    raw = await read_body(request, served.max_body)
    body, policy, encoded = await anyio.to_thread.run_sync(
        parse_and_encode, served, raw, schema, encode, limiter=request.app.state.encoding
    )
    job = submit(served, request.app.state.scheduler, body, encoded, policy, prompt_param)
    return await _respond(request, body, job, form)


# --------------------------------------------------------------------------------------------- responses


async def _respond(request: Request, body: BaseRequest, job: Job, form: ResponseFormat) -> Response:
    """The job's answer in the endpoint's format: one JSON body, or server-sent events if it asked to stream."""
    scheduler: Scheduler = request.app.state.scheduler
    model = request.app.state.served.config.model_name
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        header = form.header(model, job.policy, stream=True)
        return StreamingResponse(
            _stream(scheduler, job, form, header, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    header = form.header(model, job.policy, stream=False)
    pieces: list[str] = []
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), POLL_DISCONNECT_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                scheduler.withdraw(job)
                return Response(status_code=499)
            continue
        if kind == "text":
            pieces.append(value)
        elif kind == "error":
            raise APIError(500, value, type="server_error")
        else:
            break
    choice = form.choice("".join(pieces), finish_reason(value))
    return JSONResponse({**header, "choices": [choice], "usage": _usage(job)})


async def _stream(
    scheduler: Scheduler, job: Job, form: ResponseFormat, header: dict, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    completed = False
    try:
        if form.opening is not None:
            yield event(form.chunk(header, form.opening))
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield event(form.chunk(header, form.delta(value)))
            elif kind == "error":
                yield event(APIError(500, value, type="server_error").body())
                break
            else:
                yield event(form.chunk(header, form.delta(None), finish_reason(value)))
                if include_usage:
                    yield event({**header, "choices": [], "usage": _usage(job)})
                break
        completed = True
        yield "data: [DONE]\n\n"
    finally:
        if not completed:  # the client left (the response was cancelled): free its place or its row
            scheduler.withdraw(job)


def _usage(job: Job) -> dict:
    return usage(job.prompt_tokens, job.completion_tokens, job.cached_tokens)


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
    chat_template: str | Path | None = None,
) -> None:
    """Load a model (see :func:`segmask.load_model`; ``chat_template`` replaces its own) and serve it until
    interrupted. ``config.causal_sink`` ``None`` becomes the model's run value, else stays the policy default."""
    config = config or ServeConfig(model_name=default_name(model_path))
    if host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach it can use the model", host)
    model, tokenizer, settings = load(
        model_path,
        policy=policy,
        causal_sink=config.causal_sink,
        attn_implementation=attn_implementation,
        chat_template=chat_template,
    )
    config = dataclasses.replace(config, causal_sink=settings.causal_sink)
    app = create_app(model, tokenizer, settings.policy, config)
    uvicorn.run(app, host=host, port=port, log_level="info")
