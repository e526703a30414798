"""An OpenAI-compatible server with MAS prefill, request batching and a segment-level prefix cache.

    segmask serve --model path/to/model --port 8000          # or, from Python:
    app = segmask.serving.create_app(model, tokenizer, policy="mas")   # then run it with uvicorn

    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "MODEL", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}'

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming over server-sent events
or not; ``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``, ``n=1``), ``GET /v1/models`` and
``GET /health`` (``HEAD`` too, for liveness probes). A request may set ``"mask_policy"`` (``causal``,
``mas``, ``prefix``) to run with another policy than the model's; every response echoes the policy it ran
with.

How a request runs::

    handler (event loop)       read the JSON body; on a worker thread validate it and encode
                               the prompt (segment ids); enqueue a Job                     -> 4xx / 429
    Scheduler (event loop)     bounded queue; takes up to max_batch jobs that sample alike
    Engine (one model thread)  per row: prefix-cache lookup, MAS prefill of the rest, store the
                               prompt's whole leading segments; stack the rows (left-padded);
                               decode them together with transformers' generate
    RowTracker (each step)     collect each row's tokens, stream its text, stop a row at EOS, its
                               max_tokens, a stop string, or when its client has gone

The package, in the order a request meets it: :mod:`~segmask.serving.protocol` (schemas, errors),
:mod:`~segmask.serving.app` (the FastAPI app, ``serve``), :mod:`~segmask.serving.requests` (a body's
checks and encoding, up to its job), :mod:`~segmask.serving.engine` (jobs, scheduler, engine) and
:mod:`~segmask.serving.prefix_cache`.

Prefill and decode are :mod:`segmask.generation`'s: a batch without the prefix cache runs
:func:`~segmask.generation.generate_ids`; with it, each row runs :func:`~segmask.generation.prefill_for_decoding`
against its cache hit and the stacked rows :func:`~segmask.generation.decode`. So a greedy request gives the
tokens of :func:`segmask.generation.generate`. The event loop never runs the model nor a chat template
(requests are parsed and encoded on a worker thread), so ``/health`` answers during a long generation or a
long conversation's encoding. Limits (``ServeConfig``: max_messages, max_prompt_chars, max_prompt_tokens,
the context) and unsupported OpenAI fields (``protocol.UNSUPPORTED``) are 400s naming what was refused.
"""

import importlib
from typing import Any

# public name -> module that defines it; imported on first use, so that `segmask serve --help` (which
# needs only ServeConfig) loads neither torch nor FastAPI
_EXPORTS = {
    "APIError": "segmask.serving.protocol",
    "ChatCompletionRequest": "segmask.serving.protocol",
    "ChatMessage": "segmask.serving.protocol",
    "CompletionRequest": "segmask.serving.protocol",
    "Engine": "segmask.serving.engine",
    "Job": "segmask.serving.engine",
    "PrefixCache": "segmask.serving.prefix_cache",
    "QueueFull": "segmask.serving.engine",
    "RowTracker": "segmask.serving.engine",
    "Sampling": "segmask.serving.engine",
    "Scheduler": "segmask.serving.engine",
    "ServeConfig": "segmask.serving.config",
    "Served": "segmask.serving.app",
    "StreamOptions": "segmask.serving.protocol",
    "TextPart": "segmask.serving.protocol",
    "create_app": "segmask.serving.app",
    "default_name": "segmask.serving.app",
    "serve": "segmask.serving.app",
    "supports_row_caches": "segmask.serving.engine",
    "validation_error": "segmask.serving.protocol",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'segmask.serving' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
