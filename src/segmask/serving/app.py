"""The FastAPI app of ``segmask serve``: the handlers, the limits they check, and :func:`serve`.

The handlers run on the event loop: they validate a request (:mod:`segmask.serving.protocol`), encode its
prompt, and hand a job to the scheduler; the model runs on the engine's thread (see the package docstring).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from transformers import StoppingCriteria, StoppingCriteriaList

from segmask.attention import layer_masks
from segmask.generation import (
    decode,
    encode_prompt,
    eos_token_ids,
    left_pad,
    pad_token_id,
    prefill_for_decoding,
)
from segmask.masks import MaskPolicy, check_policy
from segmask.prefix_cache import PrefixCache, stack_left_padded
from segmask.segments import IGNORE_INDEX, Encoded, encode_chat
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


# --------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Sampling:
    """How one request decodes: greedy when ``temperature == 0``."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self, job_id: int) -> tuple:
        """Jobs with equal keys decode in one ``generate`` call; a seeded sampling job runs alone."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", job_id)
        return ("sample", self.temperature, self.top_p)

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


_job_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One request's prompt and sampling, and the channel its results travel back on.

    The model thread calls :meth:`emit`; the handler awaits ``events``: ``("text", piece)`` any number
    of times, then ``("done", finish_reason)`` or ``("error", message)``.
    """

    input_ids: list[int]
    segment_ids: list[int]
    policy: MaskPolicy
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_job_ids))
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    def emit(self, kind: str, value: str) -> None:
        """Send an event to the handler (safe from any thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


# --------------------------------------------------------------------------------------------- engine


class RowTracker(StoppingCriteria):
    """Per-row bookkeeping at every decoding step of one batch.

    Called by ``generate`` after each new token (``input_ids`` ``[B, L + t]``); returns ``[B]`` bools,
    True for rows that are done: EOS (``finish_reason="stop"``), a stop string (``"stop"``, the text cut
    before it), ``max_tokens`` reached (``"length"``), or a client that left (``"cancelled"``, nothing
    sent). Text is streamed as it becomes final: a trailing partial UTF-8 character and anything that
    could still become a stop string are held back.
    """

    def __init__(self, jobs: Sequence[Job], tokenizer, eos_ids: set[int]) -> None:
        self.jobs = list(jobs)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.tokens: list[list[int]] = [[] for _ in self.jobs]
        self.sent = [0] * len(self.jobs)
        self.done = [False] * len(self.jobs)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new_tokens = input_ids[:, -1].tolist()
        for row, (job, token) in enumerate(zip(self.jobs, new_tokens)):
            if not self.done[row]:
                self._step(row, job, token)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _step(self, row: int, job: Job, token: int) -> None:
        if job.cancelled.is_set():
            self._finish(row, "cancelled", None)
            return
        job.completion_tokens += 1
        if token in self.eos_ids:
            self._finish(row, "stop", self._text(row))
            return
        self.tokens[row].append(token)
        text = self._text(row)
        cut = min((i for i in (text.find(s) for s in job.sampling.stop) if i >= 0), default=None)
        if cut is not None:
            self._finish(row, "stop", text[:cut])
        elif len(self.tokens[row]) >= job.sampling.max_tokens:
            self._finish(row, "length", text)
        else:
            hold = max((len(s) - 1 for s in job.sampling.stop), default=0)
            ready = len(text) - hold
            if text.endswith("\ufffd"):
                ready = min(ready, len(text) - 1)
            self._send(row, text, ready)

    def finish_all(self) -> None:
        """End the rows ``generate`` stopped without us (its own length limit)."""
        for row in range(len(self.jobs)):
            if not self.done[row]:
                self._finish(row, "length", self._text(row))

    def _text(self, row: int) -> str:
        return self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)

    def _send(self, row: int, text: str, end: int) -> None:
        if end > self.sent[row]:
            self.jobs[row].emit("text", text[self.sent[row] : end])
            self.sent[row] = end

    def _finish(self, row: int, reason: str, text: str | None) -> None:
        self.done[row] = True
        if text is not None:
            self._send(row, text, len(text))
        self.jobs[row].emit("done", reason)


class Engine:
    """Runs batches of jobs on the model; used from one thread only (the scheduler's worker).

    Rows are prefilled one by one against their prefix-cache hit, then stacked left-padded and decoded
    together. Without a prefix cache (disabled, or a model with sliding-window layers) the batch is
    prefilled as one left-padded batch instead.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, prefix_cache: PrefixCache | None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.pad_id = pad_token_id(tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer)

    def run(self, jobs: Sequence[Job]) -> None:
        """Generate for ``jobs`` (which share a batch key); every job ends with a done or error event."""
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if not jobs:
            return
        tracker = RowTracker(jobs, self.tokenizer, self.eos_ids)
        try:
            with torch.inference_mode():
                self._generate(jobs, tracker)
            tracker.finish_all()
        except Exception as error:  # a bug or an out-of-memory: fail these requests, keep serving
            logger.exception("generation failed")
            for row, job in enumerate(jobs):
                if not tracker.done[row]:
                    tracker.done[row] = True
                    job.emit("error", f"generation failed: {type(error).__name__}: {error}")

    def _generate(self, jobs: list[Job], tracker: RowTracker) -> None:
        encoded = [
            Encoded(job.input_ids, job.segment_ids, [IGNORE_INDEX] * job.prompt_tokens) for job in jobs
        ]
        batch = left_pad(encoded, self.pad_id)
        if self.prefix_cache is not None:
            rows = [self._prefill_row(job) for job in jobs]
            cache = rows[0] if len(rows) == 1 else stack_left_padded(rows, self.model.config)
        else:
            cache = prefill_for_decoding(
                self.model, batch["input_ids"], batch["segment_ids"], batch["attention_mask"]
            )
        sampling = jobs[0].sampling
        seeded = sampling.seed is not None and not sampling.greedy  # then the job runs alone
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        # a seeded job draws from its own stream and leaves the shared random state as it was
        with torch.random.fork_rng(devices=devices) if seeded else contextlib.nullcontext():
            if seeded:
                torch.manual_seed(sampling.seed)
            decode(
                self.model,
                batch["input_ids"],
                batch["attention_mask"],
                cache,
                max_new_tokens=max(job.sampling.max_tokens for job in jobs),
                pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([tracker]),
                **sampling.generate_kwargs(),
            )

    def _prefill_row(self, job: Job):
        """One row's cache of all prompt tokens but the last, reusing the longest cached prefix."""
        assert self.prefix_cache is not None
        ids, segments = job.input_ids, job.segment_ids
        use_cache = job.policy != "prefix"  # one segment spans the prompt: nothing reusable
        hit = self.prefix_cache.lookup(ids, segments) if use_cache else None
        start = hit.length if hit is not None else 0
        cache = prefill_for_decoding(
            self.model,
            torch.tensor([ids[start:]]),
            torch.tensor([segments[start:]]),
            None,
            hit.cache if hit is not None else None,
        )
        job.cached_tokens = start
        if use_cache:
            self.prefix_cache.store(ids, segments, cache)
        return cache


def supports_row_caches(model: torch.nn.Module) -> bool:
    """Whether per-row caches can be stacked and reused: every layer keeps full attention."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    try:
        return all(layer.window is None for layer in layer_masks(config.get_text_config(decoder=True)))
    except ValueError:  # layer types segmask cannot describe: no stacking, no reuse
        return False


# --------------------------------------------------------------------------------------------- scheduler


class Scheduler:
    """A bounded queue of jobs and the loop that feeds them, in batches, to the model thread.

    Lives on the event loop; :meth:`submit` raises a 429 :class:`APIError` when ``max_queue`` jobs wait.
    A batch is the oldest job plus up to ``max_batch - 1`` later ones with the same batch key.
    """

    def __init__(self, engine: Engine, max_batch: int, max_queue: int, retry_after_s: int) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.completed = 0
        self.cancelled = 0
        self.batches = 0
        self.generated_tokens = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segmask-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._feed())

    async def stop(self) -> None:
        for job in list(self.waiting) + self.running:
            job.cancelled.set()
        for job in self.waiting:
            job.emit("error", "the server is shutting down")
        self.waiting.clear()
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> None:
        if len(self.waiting) >= self.max_queue:
            raise APIError(
                429,
                f"the server is busy ({len(self.waiting)} requests waiting); retry after {self.retry_after_s} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.waiting.append(job)
        self._wakeup.set()

    def withdraw(self, job: Job) -> None:
        """The client has gone: drop the job if it waits, stop its row if it runs."""
        if job.cancelled.is_set():
            return
        job.cancelled.set()
        self.cancelled += 1
        try:
            self.waiting.remove(job)
        except ValueError:
            pass

    def _take(self) -> list[Job]:
        first = self.waiting.popleft()
        key = first.sampling.batch_key(first.id)
        batch = [first]
        for job in list(self.waiting):
            if len(batch) == self.max_batch:
                break
            if job.sampling.batch_key(job.id) == key:
                batch.append(job)
                self.waiting.remove(job)
        return batch

    async def _feed(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take()
            self.running = batch
            try:
                await loop.run_in_executor(self._executor, self.engine.run, batch)
            except Exception:  # Engine.run reports errors itself; this is a last resort
                logger.exception("batch failed")
                for job in batch:
                    job.emit("error", "generation failed")
            finally:
                self.batches += 1
                self.completed += len(batch)
                self.generated_tokens += sum(job.completion_tokens for job in batch)
                self.running = []


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
        scheduler = Scheduler(engine, config.max_batch, config.max_queue, config.retry_after_s)
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
    job = Job(
        list(encoded.input_ids), list(encoded.segment_ids), policy, sampling, asyncio.get_running_loop()
    )
    served.scheduler.submit(job)
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
