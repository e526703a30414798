"""``segmask serve``: an OpenAI-compatible HTTP server with MAS prefill and a segment-level prefix cache.

    segmask serve --model path/to/model                       # http://127.0.0.1:8000/v1, model name "model"
    segmask serve --model run/ --api-key "$KEY" --max-batch 16 --max-context 2048

Binds to 127.0.0.1 unless ``--host`` says otherwise. ``--api-key`` (default: ``$SEGMASK_API_KEY``) makes
every ``/v1`` request need ``Authorization: Bearer KEY``; an empty ``--api-key ''`` (say, an unset variable)
is refused rather than serving without a key. The served model name defaults to the model
folder's (or file's) name; clients pass it as ``model``.
"""

from __future__ import annotations

import argparse
import os

from segmask.cli.options import add_attn_argument, add_config_arguments, add_model_arguments, config_values
from segmask.serving.config import ServeConfig

API_KEY_ENV = "SEGMASK_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, mask_help="default mask policy of requests (default: the model's, else mas)")
    # where to listen: serve()'s arguments, not ServeConfig's
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    # ServeConfig fields whose command-line default is not the field's: the key from the environment,
    # the name from the model path
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require this bearer key (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--name", default=None, help="served model name (default: the model path's name)")
    add_config_arguments(parser, ServeConfig, skip=("api_key", "model_name"))
    add_attn_argument(parser)


def run(args: argparse.Namespace) -> int:
    from segmask.serving.app import default_name, serve  # noqa: PLC0415 (torch, FastAPI: not at --help)

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    values = config_values(args, ServeConfig)  # api_key too: its flag is --api-key, its default the env's
    if args.api_key == "":  # `--api-key "$KEY"` with KEY unset must not serve openly
        raise ValueError("--api-key is empty (an unset variable?): pass a key, or leave out --api-key")
    values |= {"api_key": args.api_key, "model_name": args.name or default_name(args.model)}
    config = ServeConfig(**values)
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
        chat_template=args.chat_template,
    )
    return 0
