"""segmask.viz: segment spans, attention maps that respect the mask, and readable PNGs (the command:
tests/cli/test_viz.py)."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch
from conftest import STORYTELLER_CHAT

from segmask.masks import dense_mask
from segmask.viz import Span, attention_maps, encode_views, read_messages, segment_spans, visualize


def test_segment_spans_are_labelled_by_role():
    spans = segment_spans([0, 0, 1, 1, 1, -1], STORYTELLER_CHAT)
    assert spans == [Span(0, 2, 0, "system (0)"), Span(2, 5, 1, "user (1)"), Span(5, 6, -1, "causal")]
    assert segment_spans([-1, -1, 0]) == [Span(0, 2, -1, "causal"), Span(2, 3, 0, "segment 0")]


def test_attention_maps_follow_the_mask(chat_model):
    _, model, tokenizer = chat_model
    views = encode_views(tokenizer, STORYTELLER_CHAT, ["causal", "mas"])
    assert set(views["mas"].segment_ids) == {0, 1, -1}
    implementation = model.config._attn_implementation
    maps = attention_maps(model, views, layer=1, head=3)
    assert model.config._attn_implementation == implementation  # eager only while drawing
    length = len(views["mas"].input_ids)
    for policy, weights in maps.items():
        allowed = dense_mask(torch.tensor([views[policy].segment_ids]))[0, 0]
        assert weights.shape == (length, length)
        assert float(weights[~allowed].abs().max()) == 0.0  # nothing outside the mask
        assert torch.allclose(weights.sum(-1), torch.ones(length), atol=1e-5)
    # MAS: a system token sees the rest of its segment; token 0 (the sink, causal by default under mas) and
    # every causal token 0 see only themselves
    assert views["mas"].segment_ids[:3] == [-1, 0, 0]
    assert float(maps["mas"][1, 2:4].sum()) > 0 and float(maps["causal"][1, 2:4].sum()) == 0.0
    assert float(maps["mas"][0, 0]) == pytest.approx(1.0) and float(maps["causal"][0, 0]) == pytest.approx(
        1.0
    )
    mean = attention_maps(model, {"mas": views["mas"]}, layer=-1)["mas"]
    assert mean.shape == (length, length)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        attention_maps(model, views, layer=9)
    with pytest.raises(ValueError, match="head 8 out of range"):
        attention_maps(model, views, layer=0, head=8)


def test_visualize_writes_readable_pngs(chat_model, tmp_path):
    _, model, tokenizer = chat_model
    paths = visualize(model, tokenizer, STORYTELLER_CHAT, tmp_path / "figures", layer=0, head=1)
    assert [p.name for p in paths] == ["mask.png", "attention_layer0_head1.png"]
    for path in paths:
        image = matplotlib.image.imread(path)
        height, width = image.shape[:2]
        assert width > 1.5 * height > 300  # two panels side by side
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_bad_messages_file_is_named(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"role": "user"}]))
    with pytest.raises(ValueError, match="chat.json: message 0 needs string fields"):
        read_messages(path)
    path.write_text("[")
    with pytest.raises(ValueError, match="chat.json: not valid JSON"):
        read_messages(path)
    with pytest.raises(FileNotFoundError, match="no messages file"):
        read_messages(tmp_path / "missing.json")
