"""``segmask train [CONFIG.yaml] [--key value ...]``: fine-tune with a mask policy (LoRA or full).

Every :class:`segmask.training.TrainConfig` field is a flag (``cutoff_len`` -> ``--cutoff-len``); flags
override the YAML file. Examples::

    segmask train configs/cpu_smollm2.yaml --mask mas --max-steps 100 --output runs/smollm2-mas
    segmask train --model ../shared/models/stories260K --data train.json --mask prefix --lora-r 0
    accelerate launch -m segmask train configs/paper_llama3.2-1b.yaml --mask mas
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import get_origin, get_type_hints

from segmask.training import Interrupted, TrainConfig, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file of TrainConfig fields (flags override it)")
    hints = get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = f"{field.metadata.get('help', '')} (default: {_show(default)})"
        options = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="+", metavar=field.name.upper(), **options)
        else:
            parser.add_argument(flag, metavar=field.name.upper(), **options)


def _show(value) -> str:
    if isinstance(value, tuple):
        return " ".join(value) or "none"
    return "none" if value is None or value == "" else str(value)


def run(args: argparse.Namespace) -> int:
    overrides = {name: value for name, value in vars(args).items() if name in _field_names()}
    config = (
        TrainConfig.from_yaml(args.config, **overrides) if args.config else TrainConfig.from_dict(overrides)
    )
    try:
        output = train(config)
    except Interrupted as stop:
        print(f"segmask train: {stop}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") == "0":  # one line for a torchrun / accelerate job, not one per process
        print(f"trained ({config.mask}) -> {output}")
    return 0


def _field_names() -> set[str]:
    return {field.name for field in dataclasses.fields(TrainConfig)}
