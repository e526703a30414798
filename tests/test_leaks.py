"""segmask.leaks: the perturbation test passes on masked models and catches a model that sees the future."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import segmask
from segmask.leaks import leak_check
from segmask.segments import Encoded


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    return segmask.enable(LlamaForCausalLM(config).eval())


def example(segment_ids: list[int]) -> Encoded:
    ids = [(7 * i + 3) % 64 for i in range(len(segment_ids))]
    return Encoded(ids, segment_ids, [-100] * len(segment_ids))


def test_leak_check_accepts_a_recurring_segment_and_restores_training_mode():
    model = tiny_model().train()
    assert leak_check(model, example([0, 0, 1, 1, 0, 0, -1, -1])) <= 1e-4
    assert model.training


@pytest.mark.parametrize(
    "segment_ids",
    [
        [0, 0, 0, 1, 1, 1, -1, -1, -1],
        [-1] * 9,
        [0] * 6 + [-1] * 3,
        [-1, 0, 0, 1, 1, 1, -1, -1, -1],  # causal_sink: token 0 causal (issue 20)
        [-1] + [0] * 5 + [-1] * 3,  # causal_sink under prefix
    ],
)
def test_leak_check_passes_on_a_masked_model(segment_ids):
    assert leak_check(tiny_model(), example(segment_ids)) <= 1e-4


class PeekingModel(nn.Module):
    """Every position's logits see the whole sequence (a broken mask): the leak check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 64)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def forward(self, input_ids, segment_ids):
        hidden = self.embed(input_ids)
        return SimpleNamespace(logits=hidden + hidden.mean(dim=1, keepdim=True))


def test_leak_check_catches_a_model_that_sees_the_future():
    with pytest.raises(ValueError, match="leak: changing the tokens from position 3"):
        leak_check(PeekingModel(), example([0, 0, 0, 1, 1, -1, -1]))


def test_leak_check_needs_a_cut():
    with pytest.raises(ValueError, match="no cut"):
        leak_check(tiny_model(), example([0, 0, 0]))
