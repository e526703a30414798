"""The ``segmask`` command line: each subcommand parses its flags, calls one library function, prints.

Every subcommand lives in ``segmask/cli/<name>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``
(and, where its parser needs them, ``PARSER_OPTIONS`` for ``add_parser``). Only the command being run is
imported, and a command module imports torch, transformers or FastAPI inside ``run``, not at its top, so
``segmask --help`` and ``segmask <command> --help`` start at once (``benchmarks/cli_start.py``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection

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


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the flags of ``commands`` (default: all), whose modules it imports; the other
    commands are listed by name only."""
    parser = argparse.ArgumentParser(prog="segmask", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if commands is not None and name not in commands:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        module = importlib.import_module(f"segmask.cli.{name.replace('-', '_')}")
        options = getattr(module, "PARSER_OPTIONS", {})
        command = sub.add_parser(name, help=help_text, description=help_text, **options)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[:1] if argv and argv[0] in COMMANDS else []  # `segmask --help` imports no command
    args = build_parser(command).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"segmask {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
