"""``segmask viz``: mask and attention-map PNGs of a chat prompt, causal and MAS side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from segmask.files import check_outputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="model folder, .gguf file or segmask run folder (needs a chat template)",
    )
    parser.add_argument("--messages", required=True, help='JSON file: [{"role": ..., "content": ...}, ...]')
    parser.add_argument("--layer", type=int, default=-1, help="layer to draw (default: the last)")
    parser.add_argument("--head", type=int, default=None, help="head to draw (default: mean over heads)")
    parser.add_argument("--policies", default="causal,mas", help="comma-separated policies, one panel each")
    parser.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    from segmask import loading, viz  # noqa: PLC0415 (torch, matplotlib: not at --help)

    messages = viz.read_messages(args.messages)
    if Path(args.out).is_file():
        raise ValueError(f"--out {args.out} is a file; give the folder to write the drawings into")
    check_outputs([("--out", viz.mask_path(args.out))], [args.messages])
    model, tokenizer, _ = loading.load_model(args.model)
    layers = model.config.num_hidden_layers  # the attention drawing's name needs them
    check_outputs([("--out", viz.attention_path(args.out, layers, args.layer, args.head))], [args.messages])
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for path in viz.visualize(model, tokenizer, messages, args.out, args.layer, args.head, policies):
        print(path)
    return 0
