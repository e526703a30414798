"""``segmask chat``: an interactive terminal chat with MAS prefill and a KV cache kept across turns.

    segmask chat --model path/to/model [--mask mas] [--system "You are terse."]
    segmask chat --model base-model/ --chat-template template.jinja    # a model without a chat template

The prompt line shows the mask policy in use (``[mas] you> ``). Commands: ``/system TEXT`` sets the
system message (an empty TEXT removes it), ``/reset`` clears the conversation, ``/mask POLICY`` switches the policy, ``/quit`` (or
end of input) leaves.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from segmask.cli.options import (
    add_causal_sink_argument,
    add_model_arguments,
    add_sampling_arguments,
    generation_kwargs,
    load_from,
)
from segmask.policies import POLICIES

HELP = "commands: /system TEXT, /reset, /mask {" + ",".join(POLICIES) + "}, /quit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_causal_sink_argument(parser)
    parser.add_argument("--system", default=None, metavar="TEXT", help="system message")
    add_sampling_arguments(parser, max_new_tokens=256)


def run(args: argparse.Namespace) -> int:
    from segmask.chat import ChatSession  # noqa: PLC0415 (torch, transformers: not at --help)

    kwargs = generation_kwargs(args)
    model, tokenizer, settings = load_from(args)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{args.model} has no chat template; pass one with --chat-template FILE")
    session = ChatSession(
        model,
        tokenizer,
        policy=settings.policy,
        system=args.system,
        causal_sink=settings.causal_sink,
        **kwargs,
    )
    print(f"segmask chat: {args.model} ({HELP})", flush=True)
    return loop(session, sys.stdin, sys.stdout)


def loop(session, stdin: TextIO, stdout: TextIO) -> int:
    """Read lines, run commands or turns, stream the replies; returns at ``/quit`` or end of input.

    Ctrl-C during a reply stops it (the turn is dropped); at the prompt it leaves.
    """
    from segmask.hook import ContextOverflowError  # noqa: PLC0415 (torch: not at --help)

    while True:
        stdout.write(f"[{session.policy}] you> ")
        stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            stdout.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if command(session, line, stdout):
                return 0
            continue
        stdout.write("assistant> ")
        try:
            for piece in session.stream(line):
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" (interrupted; turn dropped)")
        except ContextOverflowError as error:
            stdout.write(f"(not sent: {error}; /reset starts afresh)")
        stdout.write("\n")
        stdout.flush()


def command(session, line: str, stdout: TextIO) -> bool:
    """Run one ``/command``; returns True to leave the chat."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/quit", "/exit"):
        return True
    if name == "/reset":
        session.reset()
        stdout.write("(conversation cleared)\n")
    elif name == "/system":
        session.system = rest or None
        stdout.write(f"(system message: {rest!r})\n" if rest else "(system message removed)\n")
    elif name == "/mask" and rest in POLICIES:
        session.set_policy(rest)
        note = (
            "; the whole prompt is one segment, so each turn re-prefills the conversation"
            if rest == "prefix"
            else ""
        )
        stdout.write(f"(mask policy: {rest}{note})\n")
    else:
        stdout.write(f"({HELP})\n")
    stdout.flush()
    return False
