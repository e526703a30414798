"""Pictures of the mask and of attention maps, causal and MAS side by side (the paper's demo notebook).

    segmask viz --model PATH --messages chat.json --layer 0 --head 0 --out figures/

``chat.json`` holds a list of ``{"role", "content"}`` messages (or ``{"messages": [...]}``). The prompt is
encoded with its generation prompt, once per policy; ``mask.png`` shows each policy's mask and
``attention_layer<L>_head<H>.png`` the attention probabilities of one head (``mean`` over heads without
``--head``). Both mark the segments on the axes: a line at each boundary, the segment's role as the label.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from segmask.files import read_json
from segmask.hook import enable
from segmask.masks import dense_mask
from segmask.policies import check_policy
from segmask.segments import Encoded, encode_chat

TITLES = {"causal": "causal", "mas": "MAS", "prefix": "prefix"}


@dataclass(frozen=True)
class Span:
    """Tokens ``[start, end)`` of one segment (``segment_id`` -1: causal tokens), labelled for the axes."""

    start: int
    end: int
    segment_id: int
    label: str


def read_messages(path: str | Path) -> list[dict]:
    """Messages from a JSON file: a list of ``{"role", "content"}`` or an object with a ``messages`` list."""
    data = read_json(path, "messages")
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{path}: expected a non-empty list of messages (or an object with 'messages')")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not all(
            isinstance(message.get(k), str) for k in ("role", "content")
        ):
            raise ValueError(f"{path}: message {index} needs string fields 'role' and 'content'")
    return messages


def encode_views(tokenizer, messages: list[dict], policies: Sequence[str]) -> dict[str, Encoded]:
    """The prompt (with its generation prompt) encoded under each policy; the token ids must agree."""
    views = {
        check_policy(policy): encode_chat(tokenizer, messages, policy=policy, add_generation_prompt=True)
        for policy in policies
    }
    ids = {tuple(view.input_ids) for view in views.values()}
    if len(ids) != 1:
        raise ValueError("the policies tokenised the same messages differently")
    return views


def segment_spans(segment_ids: Sequence[int], messages: Sequence[dict] | None = None) -> list[Span]:
    """Runs of equal segment ids. Segment ``k`` is labelled with the role of the ``k``-th prompt turn when
    ``messages`` are given (prompt turns: every message but the assistant's), else ``segment k``."""
    roles = [m["role"] for m in messages or () if m["role"] != "assistant"]
    spans: list[Span] = []
    start = 0
    for position in range(1, len(segment_ids) + 1):
        if position == len(segment_ids) or segment_ids[position] != segment_ids[start]:
            segment = segment_ids[start]
            if segment < 0:
                label = "causal"
            elif segment < len(roles):
                label = f"{roles[segment]} ({segment})"
            else:
                label = f"segment {segment}"
            spans.append(Span(start, position, segment, label))
            start = position
    return spans


@contextmanager
def eager_attention(model: nn.Module):
    """Run ``model`` with eager attention (the only backend that returns attention probabilities)."""
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)


@torch.inference_mode()
def attention_maps(
    model: nn.Module, views: dict[str, Encoded], layer: int = -1, head: int | None = None
) -> dict[str, torch.Tensor]:
    """Attention probabilities ``[L, L]`` (query x key) of one layer, per policy; ``head=None``: mean over heads."""
    enable(model)
    maps = {}
    with eager_attention(model):
        for policy, view in views.items():
            ids = torch.tensor([view.input_ids], device=model.device)
            segments = torch.tensor([view.segment_ids], device=model.device)
            attentions = model(input_ids=ids, segment_ids=segments, output_attentions=True).attentions
            if not -len(attentions) <= layer < len(attentions):
                raise ValueError(f"layer {layer} out of range: the model has {len(attentions)} layers")
            weights = attentions[layer][0].float()  # [heads, L, L]
            if head is not None and not -weights.shape[0] <= head < weights.shape[0]:
                raise ValueError(f"head {head} out of range: layer {layer} has {weights.shape[0]} heads")
            maps[policy] = (weights.mean(0) if head is None else weights[head]).cpu()
    return maps


def _mark_segments(ax, spans: list[Span]) -> None:
    centers = [(span.start + span.end - 1) / 2 for span in spans]
    labels = [span.label for span in spans]
    ax.set_xticks(centers, labels, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(centers, labels, fontsize="small")
    for span in spans[1:]:
        ax.axhline(span.start - 0.5, color="tab:red", linewidth=0.8)
        ax.axvline(span.start - 0.5, color="tab:red", linewidth=0.8)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")


def _panels(images: dict[str, torch.Tensor], spans: list[Span], title: str, out: Path, **imshow) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(images), figsize=(5.2 * len(images), 5.4), layout="constrained", squeeze=False
    )
    for ax, (policy, image) in zip(axes[0], images.items()):
        shown = ax.imshow(image.numpy(), interpolation="nearest", **imshow)
        ax.set_title(TITLES.get(policy, policy))
        _mark_segments(ax, spans)
    fig.colorbar(shown, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_masks(views: dict[str, Encoded], spans: list[Span], out: str | Path) -> Path:
    """``out``: one panel per policy, the boolean mask (dark: may attend) from :func:`segmask.masks.dense_mask`."""
    images = {
        policy: dense_mask(torch.tensor([view.segment_ids]))[0, 0].float() for policy, view in views.items()
    }
    return _panels(
        images, spans, "attention mask (query attends to key)", Path(out), cmap="Greys", vmin=0, vmax=1
    )


def draw_attention(maps: dict[str, torch.Tensor], spans: list[Span], title: str, out: str | Path) -> Path:
    """``out``: one panel per policy, attention probabilities on a square-root colour scale."""
    from matplotlib.colors import PowerNorm

    return _panels(maps, spans, title, Path(out), cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0))


def visualize(
    model: nn.Module,
    tokenizer,
    messages: list[dict],
    out_dir: str | Path,
    layer: int = -1,
    head: int | None = None,
    policies: Sequence[str] = ("causal", "mas"),
) -> list[Path]:
    """Write ``mask.png`` and ``attention_layer<L>_head<H>.png`` for ``messages`` into ``out_dir``."""
    out_dir = Path(out_dir)
    views = encode_views(tokenizer, messages, policies)
    segmented = views.get("mas") or next(iter(views.values()))
    spans = segment_spans(segmented.segment_ids, messages)
    maps = attention_maps(model, views, layer, head)
    layer_index = layer % model.config.num_hidden_layers
    head_name = "mean" if head is None else str(head)
    title = f"attention probabilities, layer {layer_index}, head {head_name}"
    return [
        draw_masks(views, spans, mask_path(out_dir)),
        draw_attention(
            maps, spans, title, attention_path(out_dir, model.config.num_hidden_layers, layer, head)
        ),
    ]


def mask_path(out_dir: str | Path) -> Path:
    """Where :func:`visualize` draws the masks: ``out_dir/mask.png``."""
    return Path(out_dir) / "mask.png"


def attention_path(out_dir: str | Path, layers: int, layer: int = -1, head: int | None = None) -> Path:
    """Where :func:`visualize` draws the attention maps of a model of ``layers`` layers:
    ``out_dir/attention_layer<L>_head<H>.png`` (``L`` counted from 0, ``H`` ``mean`` without a head)."""
    return Path(out_dir) / f"attention_layer{layer % layers}_head{'mean' if head is None else head}.png"
