"""``segmask serve``: an OpenAI-compatible HTTP server with MAS prefill and a segment-level prefix cache.

    segmask serve --model path/to/model                       # http://127.0.0.1:8000/v1, model name "model"
    segmask serve --model run/ --api-key "$KEY" --max-batch 16 --max-context 2048

Binds to 127.0.0.1 unless ``--host`` says otherwise. ``--api-key`` (default: ``$SEGMASK_API_KEY``) makes
every ``/v1`` request need ``Authorization: Bearer KEY``. The served model name defaults to the model
folder's (or file's) name; clients pass it as ``model``.
"""

from __future__ import annotations

import argparse
import os

from segmask.attention import SUPPORTED
from segmask.cli.options import add_model_arguments

API_KEY_ENV = "SEGMASK_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, mask_help="default mask policy of requests (default: the model's, else mas)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require this bearer key (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--name", default=None, help="served model name (default: the model path's name)")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together")
    parser.add_argument(
        "--max-context",
        type=int,
        default=None,
        metavar="N",
        help="prompt + completion tokens (default: the model's)",
    )
    parser.add_argument("--max-queue", type=int, default=64, metavar="N", help="waiting requests before 429")
    parser.add_argument(
        "--prefix-cache-mb", type=float, default=256.0, metavar="MB", help="prefix cache memory (0: off)"
    )
    parser.add_argument(
        "--attn",
        default=None,
        choices=SUPPORTED,
        help="attention implementation",
    )


def run(args: argparse.Namespace) -> int:
    # here, not at the top: the server stack (FastAPI, uvicorn, the loaders) loads only when serve runs,
    # as every command's library does, so building the parser for another command stays cheap
    from segmask.serving import ServeConfig, default_name, serve

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    config = ServeConfig(
        max_batch=args.max_batch,
        max_context=args.max_context,
        max_queue=args.max_queue,
        api_key=args.api_key or None,
        prefix_cache_mb=args.prefix_cache_mb,
        model_name=args.name or default_name(args.model),
    )
    print(
        f"segmask serve: {args.model} as {config.model_name!r} on http://{args.host}:{args.port}/v1",
        flush=True,
    )
    serve(
        args.model,
        policy=args.mask,
        host=args.host,
        port=args.port,
        config=config,
        attn_implementation=args.attn,
    )
    return 0
