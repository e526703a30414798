"""``segmask eval``: accuracy on the commonsense suite under a mask policy (see :mod:`segmask.evaluation`).

Every :class:`segmask.eval_config.EvalConfig` field but ``policy`` is a flag (``num_beams`` -> ``--num-beams``);
``--mask`` picks the policy, as in every command that loads a model. ``--causal-sink/--no-causal-sink``
absent is the run's saved value, else the policy's default (on under mas); ``--template`` absent is the run's
saved template, else alpaca (both: :func:`segmask.runs.resolve_settings`). The paper's
protocol: ``--template paper --extract official`` (scoring generate, 4 beams, 32 new tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from segmask.cli.options import add_config_arguments, add_model_arguments, config_values
from segmask.eval_config import EvalConfig
from segmask.files import check_outputs
from segmask.results import journal_path, predictions_path
from segmask.tasks.commonsense import task_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    # policy: --mask, resolved by load_model (default: the model's own); out: the command prints its table
    add_config_arguments(parser, EvalConfig, skip=("policy",), required=("out",))
    # not EvalConfig fields: --greedy sets num_beams to 1, --no-progress is evaluate's progress=False
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam search")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from segmask.compare import compare_runs  # noqa: PLC0415 (scipy, torch: not at --help)
    from segmask.evaluation import evaluate  # noqa: PLC0415

    values = config_values(args, EvalConfig)
    values["tasks"] = ",".join(values["tasks"])  # "--tasks boolq,piqa" (or names apart)
    if args.greedy:
        values["num_beams"] = 1
    config = EvalConfig(**values)  # checked, and every task file found, before the model loads
    inputs = [task_path(config.data_dir, name) for name in config.tasks] + [args.model]
    if args.chat_template is not None and os.path.isfile(args.chat_template):
        inputs.append(args.chat_template)
    written = (args.out, predictions_path(args.out), journal_path(args.out))
    check_outputs([("--out", path) for path in written], inputs)
    from segmask.loading import load  # noqa: PLC0415  (torch and transformers: not at --help)

    # the flags as given (the config resolved an absent --causal-sink for its default policy)
    model, tokenizer, settings = load(
        args.model,
        policy=args.mask,
        causal_sink=values.get("causal_sink"),
        template=values.get("template"),
        chat_template=args.chat_template,
    )
    config = dataclasses.replace(
        config, policy=settings.policy, causal_sink=settings.causal_sink, template=settings.template
    )
    evaluate(model, tokenizer, config, model_name=args.model, progress=not args.no_progress)
    print(compare_runs([args.out]), end="")
    print(f"results: {args.out}")
    return 0
