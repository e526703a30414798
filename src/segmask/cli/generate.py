"""``segmask generate``: one completion with MAS prefill.

    segmask generate --model path/to/model --mask mas --prompt "What is 2 + 2?" --max-new-tokens 20
    segmask generate --model run/ --messages chat.json --json      # {"text": ..., "token_ids": [...]}
    segmask generate --model base/ --chat-template chat.jinja --messages chat.json   # a model without one

``--prompt`` becomes a single user message when the tokenizer has a chat template, else raw text;
``--chat-template`` (a Jinja file, or the template inline, as vLLM's flag) gives it one or replaces it.
``--messages`` is a JSON file holding a conversation (a list of ``{"role", "content"}`` messages) or an
instruction record (``{"instruction", "input"}``), rendered in ``--template`` (``paper``: the official
evaluation prompt of the paper's runs; absent: the run's saved template, else ``alpaca``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from segmask.cli.options import (
    add_causal_sink_argument,
    add_model_arguments,
    add_sampling_arguments,
    generation_kwargs,
    load_from,
)
from segmask.templates import TEMPLATE_HELP, TEMPLATES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_causal_sink_argument(parser)
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
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        default=None,
        help=f"{TEMPLATE_HELP}, for an instruction record (default: as the model was trained, else alpaca)",
    )
    add_sampling_arguments(parser)
    parser.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]}')


def read_prompt(args: argparse.Namespace, tokenizer):
    """The prompt the flags name: a conversation, an instruction record, or raw text."""
    if args.messages is not None:
        try:
            prompt = json.loads(args.messages.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{args.messages} is not valid JSON: {error}") from error
        if not isinstance(prompt, (list, dict)):
            raise ValueError(f"{args.messages} must hold a list of messages or an instruction record")
        if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"{args.messages} holds a conversation but {args.model} has no chat template; "
                f"pass one with --chat-template FILE"
            )
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": args.prompt}]
    return args.prompt


def run(args: argparse.Namespace) -> int:
    from segmask import generation  # noqa: PLC0415 (torch, transformers: not at --help)

    kwargs = generation_kwargs(args)
    model, tokenizer, settings = load_from(args, template=args.template)
    prompt = read_prompt(args, tokenizer)
    [result] = generation.generate(
        model,
        tokenizer,
        [prompt],
        policy=settings.policy,
        causal_sink=settings.causal_sink,
        template=settings.template,
        **kwargs,
    )
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids}))
    else:
        print(result.text)
    return 0
