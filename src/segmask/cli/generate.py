"""``segmask generate``: one completion with MAS prefill.

    segmask generate --model path/to/model --mask mas --prompt "What is 2 + 2?" --max-new-tokens 20
    segmask generate --model run/ --messages chat.json --json      # {"text": ..., "token_ids": [...]}

``--prompt`` becomes a single user message when the tokenizer has a chat template, else raw text.
``--messages`` is a JSON file holding a conversation (a list of ``{"role", "content"}`` messages) or an
instruction record (``{"instruction", "input"}``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from segmask.masks import POLICIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="transformers folder, .gguf file or segmask output folder",
    )
    parser.add_argument(
        "--mask",
        choices=POLICIES,
        default=None,
        help="mask policy (default: the one the model was trained with, else mas)",
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument(
        "--prompt", metavar="TEXT", help="the user message (raw text if the model has no chat template)"
    )
    prompt.add_argument(
        "--messages",
        type=Path,
        metavar="FILE.json",
        help="JSON file: a list of messages or an instruction record",
    )
    add_sampling_arguments(parser)
    parser.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]}')


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """``--max-new-tokens``, ``--greedy | --temperature T --top-p P`` and ``--attn``: shared with ``chat``."""
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
        choices=("eager", "sdpa", "flex_attention", "segmask"),
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


def read_prompt(args: argparse.Namespace, tokenizer):
    """The prompt the flags name: a conversation, an instruction record, or raw text."""
    if args.messages is not None:
        try:
            prompt = json.loads(args.messages.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{args.messages} is not valid JSON: {error}") from error
        if not isinstance(prompt, (list, dict)):
            raise ValueError(f"{args.messages} must hold a list of messages or an instruction record")
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": args.prompt}]
    return args.prompt


def run(args: argparse.Namespace) -> int:
    from segmask.generation import generate
    from segmask.loading import load_model

    kwargs = generation_kwargs(args)
    model, tokenizer, policy = load_model(args.model, policy=args.mask, attn_implementation=args.attn)
    [result] = generate(model, tokenizer, [read_prompt(args, tokenizer)], policy=policy, **kwargs)
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids}))
    else:
        print(result.text)
    return 0
