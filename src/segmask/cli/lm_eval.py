"""``segmask lm-eval ...``: the ``segmask-lm-eval`` command (lm-evaluation-harness's ``lm_eval`` with the
``segmask`` model registered), as a subcommand. Every argument after ``lm-eval`` goes to
:func:`segmask.integrations.lm_eval.main` unchanged, ``--help`` included::

    segmask lm-eval --model segmask --model_args pretrained=../shared/models/stories260K,mask=mas \\
        --include_path configs/lm_eval --tasks commonsense_boolq --limit 10
"""

from __future__ import annotations

import argparse

# the subcommand's parser has no options of its own: with no "-" among its prefix characters, every
# argument (--tasks, --model, -h ...) is a plain string that lands in args.argv as lm_eval will read it
PARSER_OPTIONS = {"prefix_chars": "\0", "add_help": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="lm_eval's arguments")


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top: lm_eval is an optional dependency (the dev extra), so only this
    # command needs it, and `segmask --help` and the other commands run without it
    try:
        from segmask.integrations import lm_eval
    except ModuleNotFoundError as error:
        if error.name != "lm_eval":
            raise
        raise ValueError("needs lm-evaluation-harness: pip install 'lm_eval>=0.4.5,<0.5'") from None
    lm_eval.main(args.argv)
    return 0
