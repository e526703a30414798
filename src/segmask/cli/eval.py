"""``segmask eval``: accuracy on the commonsense suite under a mask policy (see :mod:`segmask.evaluation`)."""

from __future__ import annotations

import argparse

from segmask.cli.options import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--data-dir", required=True, help="folder of <task>_test.json or <task>/test.json files"
    )
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: the whole suite)")
    parser.add_argument("--limit", type=int, default=None, help="first N records of each task")
    parser.add_argument(
        "--scoring",
        choices=("generate", "loglik"),
        default="generate",
        help="paper protocol or log-likelihood",
    )
    parser.add_argument(
        "--out", required=True, help="results JSON; predictions go to <stem>.predictions.jsonl"
    )
    parser.add_argument("--num-beams", type=int, default=4, help="beam width for generate scoring")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam search")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the predictions a stopped run with the same arguments left in <stem>.partial.jsonl",
    )


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top: they pull in torch and transformers, which `segmask --help` does not need
    from segmask.compare import compare_runs
    from segmask.evaluation import EvalConfig, evaluate
    from segmask.loading import load_model
    from segmask.tasks.commonsense import SUITE, parse_tasks, task_path

    tasks = parse_tasks(args.tasks or SUITE)
    for name in tasks:  # a missing file fails before the model loads
        task_path(args.data_dir, name)
    model, tokenizer, policy = load_model(args.model, policy=args.mask)
    config = EvalConfig(
        args.data_dir,
        tuple(tasks),
        policy,
        scoring=args.scoring,
        limit=args.limit,
        out=args.out,
        num_beams=1 if args.greedy else args.num_beams,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        resume=args.resume,
    )
    evaluate(model, tokenizer, config, model_name=args.model, progress=not args.no_progress)
    print(compare_runs([args.out]), end="")
    print(f"results: {args.out}")
    return 0
