"""Flags that several commands share: the model and its mask policy, and the decoding settings."""

from __future__ import annotations

import argparse

from segmask.attention import SUPPORTED
from segmask.masks import POLICIES


def add_model_arguments(
    parser: argparse.ArgumentParser,
    mask_help: str = "mask policy (default: the one the model was trained with, else mas)",
) -> None:
    """``--model PATH`` and ``--mask POLICY``, as :func:`segmask.loading.load_model` reads them."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="transformers folder, .gguf file or segmask output folder",
    )
    parser.add_argument("--mask", choices=POLICIES, default=None, help=mask_help)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """``--max-new-tokens``, ``--greedy | --temperature T --top-p P`` and ``--attn`` of ``generate`` and ``chat``."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N")
    parser.add_argument(
        "--greedy", action="store_true", help="greedy decoding (the default without sampling flags)"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, metavar="T", help="sample at this temperature"
    )
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="sample from this nucleus")
    parser.add_argument(
        "--attn",
        default=None,
        choices=SUPPORTED,
        help="attention implementation",
    )


def generation_kwargs(args: argparse.Namespace) -> dict:
    """transformers ``generate`` arguments from the sampling flags."""
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    sampling = args.temperature is not None or args.top_p is not None
    if args.greedy and sampling:
        raise ValueError("--greedy cannot be combined with --temperature or --top-p")
    if not sampling:
        return {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    if args.temperature is not None and args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": True}
    kwargs["temperature"] = args.temperature if args.temperature is not None else 1.0
    kwargs["top_p"] = args.top_p if args.top_p is not None else 1.0
    return kwargs
