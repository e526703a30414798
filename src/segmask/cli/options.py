"""Flags that several commands share: a config dataclass's fields, the model and its mask policy, the
attention backend, and the decoding settings."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from segmask.policies import CAUSAL_SINK_HELP_RUN, POLICIES, SUPPORTED


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config: type,
    *,
    skip: Collection[str] = (),
    required: Collection[str] = (),
    overrides_file: bool = False,
) -> None:
    """One flag per field of the dataclass ``config`` (``max_batch`` -> ``--max-batch``), the field's
    ``metadata["help"]`` (and ``metadata["metavar"]``) followed by its default.

    ``metadata["flag"]`` names a flag other than the field's (``policy``: ``--mask``, as in every command).
    A ``bool`` is ``--x / --no-x``, a tuple takes one or more values, a ``Literal`` offers its values as
    choices, and a field without a default is a required flag. Fields in ``skip`` get no flag (the command
    sets them another way); those in ``required`` must be given although the field has a default.

    Each value parses to the field's type and an absent flag holds the field's default, so
    ``config(**config_values(args, config))`` is the config the flags describe. With ``overrides_file``
    (``train``: flags override a YAML file) an absent flag leaves no attribute, so the file's value stands,
    and values stay strings for the config to coerce as it coerces the file's.
    """
    hints = get_type_hints(config)
    defaults = {}
    for field in dataclasses.fields(config):
        if field.name in skip:
            continue
        kind = _optional_of(hints[field.name])
        help_text = field.metadata.get("help", "")
        options: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        if field.default is dataclasses.MISSING or field.name in required:
            options["required"] = True
        else:
            defaults[field.name] = field.default
            if "(default:" not in help_text:  # a help that explains its default keeps its own words
                help_text = f"{help_text} (default: {_show(field.default)})".lstrip()
        options["help"] = help_text or None
        flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        options["metavar"] = field.metadata.get("metavar", field.name.upper())
        if get_origin(kind) is tuple:
            options["nargs"] = "+"
        elif get_origin(kind) is Literal:
            options["choices"] = get_args(kind)
            del options["metavar"]
        elif not overrides_file and kind in (int, float):
            options["type"] = kind
        parser.add_argument(flag, **options)
    if not overrides_file:
        parser.set_defaults(**defaults)  # after add_argument, so argparse adds no default text of its own


def config_values(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The values of ``config``'s fields among the parsed ``args`` (lists of a tuple field as tuples)."""
    names = {field.name for field in dataclasses.fields(config)}
    return {
        name: tuple(value) if isinstance(value, list) else value
        for name, value in vars(args).items()
        if name in names
    }


def _optional_of(kind: Any) -> Any:
    """``X`` for ``X | None``, else ``kind``."""
    if get_origin(kind) in (Union, UnionType):
        kinds = [k for k in get_args(kind) if k is not NoneType]
        if len(kinds) == 1:
            return kinds[0]
    return kind


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(value) or "none"
    return "none" if value is None or value == "" else str(value)


def add_model_arguments(
    parser: argparse.ArgumentParser,
    mask_help: str = "mask policy (default: the one the model was trained with, else mas)",
) -> None:
    """``--model PATH``, ``--mask POLICY`` and ``--chat-template FILE``, as :func:`segmask.loading.load_model`
    reads them."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="transformers folder, .gguf file or segmask output folder",
    )
    parser.add_argument("--mask", choices=POLICIES, default=None, help=mask_help)
    add_chat_template_argument(parser)


def load_from(args: argparse.Namespace, **settings: Any):
    """:func:`segmask.loading.load` for the flags of :func:`add_model_arguments` (``--attn`` and
    ``--causal-sink`` where the command has them; ``settings`` such as ``template=`` go through). Returns
    ``(model, tokenizer, settings)``."""
    from segmask.loading import load  # noqa: PLC0415 (torch and transformers: not at --help)

    settings.setdefault("causal_sink", getattr(args, "causal_sink", None))
    if getattr(args, "attn", None) is not None:
        settings["attn_implementation"] = args.attn
    return load(args.model, policy=args.mask, chat_template=args.chat_template, **settings)


def add_causal_sink_argument(parser: argparse.ArgumentParser) -> None:
    """``--causal-sink / --no-causal-sink``: token 0 causal under mas and prefix
    (:func:`segmask.segments.sink_segments`); absent, :func:`segmask.runs.resolve_settings` decides."""
    parser.add_argument(
        "--causal-sink",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=CAUSAL_SINK_HELP_RUN,
    )


def add_chat_template_argument(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """``--chat-template FILE``: a Jinja chat template in place of the model's, as vLLM's flag (a file, or the
    template itself on one line); :func:`segmask.loading.load_model`'s ``chat_template`` (``train``: the
    :class:`~segmask.train_config.TrainConfig` field, ``default`` ``argparse.SUPPRESS`` so that an absent flag
    leaves the YAML file's value)."""
    parser.add_argument(
        "--chat-template",
        default=default,
        metavar="FILE",
        help="Jinja chat template file (or the template itself, inline) replacing the model's; "
        "lets a model without one chat (default: the model's)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """``--max-new-tokens``, ``--greedy | --temperature T --top-p P`` and ``--attn`` of ``generate`` and ``chat``."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N")
    parser.add_argument(
        "--greedy", action="store_true", help="greedy decoding (the default without sampling flags)"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, metavar="T", help="sample at this temperature"
    )
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="sample from this nucleus")
    add_attn_argument(parser)


def add_attn_argument(parser: argparse.ArgumentParser) -> None:
    """``--attn``: one of :data:`segmask.policies.SUPPORTED` (default: the loader's choice)."""
    parser.add_argument("--attn", default=None, choices=SUPPORTED, help="attention implementation")


def generation_kwargs(args: argparse.Namespace) -> dict:
    """transformers ``generate`` arguments from the sampling flags."""
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    sampling = args.temperature is not None or args.top_p is not None
    if args.greedy and sampling:
        raise ValueError("--greedy cannot be combined with --temperature or --top-p")
    if not sampling:
        return {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    if args.temperature is not None and args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": True}
    kwargs["temperature"] = args.temperature if args.temperature is not None else 1.0
    kwargs["top_p"] = args.top_p if args.top_p is not None else 1.0
    return kwargs
