"""The ``segmask`` command line: each subcommand parses its flags, calls one library function, prints.

Every subcommand lives in ``segmask/cli/<name>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``
(and, where its parser needs them, ``PARSER_OPTIONS`` for ``add_parser``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> one-line help; the module segmask.cli.<name with - as _> implements it
COMMANDS = {
    "generate": "generate text with MAS prefill and causal decoding",
    "chat": "interactive terminal chat with MAS prefill",
    "train": "fine-tune a model with a mask policy (LoRA or full)",
    "eval": "evaluate on the commonsense suite",
    "compare": "compare evaluation results (table, chart, McNemar tests)",
    "viz": "draw masks and attention maps",
    "serve": "OpenAI-compatible server with MAS prefill",
    "lm-eval": "lm-evaluation-harness with the segmask model (as segmask-lm-eval)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segmask", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"segmask.cli.{name.replace('-', '_')}")
        options = getattr(module, "PARSER_OPTIONS", {})
        command = sub.add_parser(name, help=help_text, description=help_text, **options)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"segmask {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
