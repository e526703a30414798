"""``segmask train [CONFIG.yaml] [--key value ...]``: fine-tune with a mask policy (LoRA or full).

Every :class:`segmask.train_config.TrainConfig` field is a flag (``cutoff_len`` -> ``--cutoff-len``); flags
override the YAML file. Examples::

    segmask train configs/cpu_smollm2.yaml --mask mas --max-steps 100 --output runs/smollm2-mas
    segmask train --model ../shared/models/stories260K --data train.json --mask prefix --lora-r 0
    segmask train --model ../shared/models/stories260K --data chats.jsonl --chat-template chatml.jinja
    accelerate launch -m segmask train configs/paper_llama3.2-1b.yaml --mask mas
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from segmask.cli.options import add_chat_template_argument, add_config_arguments, config_values
from segmask.train_config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file of TrainConfig fields (flags override it)")
    # chat_template: the flag every command that reads chat has (an absent flag leaves the YAML's value)
    add_config_arguments(parser, TrainConfig, skip=("chat_template",), overrides_file=True)
    add_chat_template_argument(parser, default=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from segmask.train_output import finished_step  # noqa: PLC0415 (torch, transformers: not at --help)
    from segmask.training import Interrupted, train  # noqa: PLC0415

    overrides = config_values(args, TrainConfig)
    config = (
        TrainConfig.from_yaml(args.config, **overrides) if args.config else TrainConfig.from_dict(overrides)
    )
    finished = finished_step(Path(config.output)) if config.resume else None
    try:
        output = train(config)  # resuming a finished run returns at once, having written nothing
    except Interrupted as stop:
        print(f"segmask train: {stop}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") != "0":  # one line for a torchrun / accelerate job, not one per process
        return 0
    if finished is not None:
        print(f"segmask train: {output} already finished at step {finished}; nothing to do", file=sys.stderr)
    print(f"trained ({config.policy}) -> {output}")
    return 0
