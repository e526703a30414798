"""MAS versions of vLLM's Llama, Qwen2 and Qwen3 models: prefill under the mask, decode as vLLM does.

Each class subclasses vLLM's own and changes nothing unless the model folder asks for a MAS policy
(:func:`segmask.integrations.vllm.plugin.settings_for`). Then:

- ``forward`` reads each request's rows from the step's attention metadata (``query_start_loc``,
  ``seq_lens``). A request whose whole prompt is in this step (its query length is its sequence length)
  gets segment ids from its token ids (:class:`~segmask.integrations.vllm.prompts.PromptSegmenter`) and a
  mask from :func:`segmask.masks.sdpa_mask`, the one rule;
- every attention layer runs as vLLM runs it (so K/V land in the paged cache and every other row is
  vLLM's), then a forward hook recomputes those requests' rows with torch SDPA under their mask. Layer
  ``l + 1`` projects its K/V from layer ``l``'s corrected output, so the cache holds MAS prefill states;
- decoding (one causal query per request) is vLLM's paged attention, untouched: generated tokens are
  causal under every policy.

A request whose segments are all causal (policy ``causal``, or a prompt of only the sink) is not
recomputed. Engines that would split or reuse a prompt (chunked prefill, prefix caching), capture the
forward (CUDA graphs, ``torch.compile``) or draft tokens are refused at start (:mod:`.plugin`).
"""

from __future__ import annotations

import logging

import torch
from torch.nn import functional as F
from transformers import AutoTokenizer
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from segmask.integrations.vllm.plugin import ServedMask, VllmChangedError, settings_for
from segmask.integrations.vllm.prompts import PromptSegmenter
from segmask.masks import sdpa_mask

logger = logging.getLogger(__name__)

#: attributes of vLLM's ``Attention`` layer the hook reads (checked on every layer at load)
LAYER_ATTRIBUTES = ("num_heads", "num_kv_heads", "head_size", "head_size_v", "layer_name", "sliding_window")
#: attributes of a step's attention metadata the plan reads
METADATA_ATTRIBUTES = ("query_start_loc", "seq_lens")

# (start row, end row, SDPA mask [1, 1, L, L]) of one whole-prompt request in this step
Block = tuple[int, int, torch.Tensor]


class MasPrefill:
    """The MAS prefill of one model: its segmenter, its attention layers' hooks, this step's blocks."""

    def __init__(self, model: torch.nn.Module, settings: ServedMask, tokenizer) -> None:
        self.segmenter = PromptSegmenter(
            tokenizer, settings.policy, settings.causal_sink, settings.chat_template
        )
        self.layers = [module for module in model.modules() if isinstance(module, Attention)]
        if not self.layers:
            raise VllmChangedError(f"{type(model).__name__} has no vllm Attention layer to hook")
        for layer in self.layers:
            check_layer(layer)
            layer.register_forward_hook(self._attend, with_kwargs=True)
        self.blocks: list[Block] = []

    def plan(self, input_ids: torch.Tensor | None) -> None:
        """This step's blocks: each request whose whole prompt is here and which has a bidirectional segment."""
        self.blocks = []
        metadata = get_forward_context().attn_metadata
        if metadata is None or input_ids is None:  # a dummy run (profiling, warm-up)
            return
        if isinstance(metadata, list):
            raise VllmChangedError(
                "the attention metadata is a list (micro-batching), which segmask cannot read"
            )
        metadata = metadata.get(self.layers[0].layer_name)
        if metadata is None:
            return
        missing = [name for name in METADATA_ATTRIBUTES if not hasattr(metadata, name)]
        if missing:
            raise VllmChangedError(f"{type(metadata).__name__} lacks {', '.join(missing)}")
        starts = metadata.query_start_loc.tolist()
        lengths = metadata.seq_lens.tolist()
        tokens = input_ids.tolist()
        for request, length in enumerate(lengths):
            start, end = starts[request], starts[request + 1]
            if end - start != length or length == 0:  # decoding, or a prompt with cached tokens before it
                continue
            segments = self.segmenter(tokens[start:end])
            if max(segments) < 0:
                continue
            mask = sdpa_mask(torch.tensor([segments], device=input_ids.device))
            self.blocks.append((start, end, mask))

    def _attend(
        self, layer: Attention, args: tuple, kwargs: dict, output: torch.Tensor
    ) -> torch.Tensor | None:
        """Replace the rows of this step's blocks with SDPA under their masks (vLLM wrote K/V already)."""
        if not self.blocks:
            return None
        query, key, value = (*args, *(kwargs.get(name) for name in ("query", "key", "value")[len(args) :]))[
            :3
        ]
        heads, kv_heads = layer.num_heads, layer.num_kv_heads
        query = query.view(-1, heads, layer.head_size)
        key = key.view(-1, kv_heads, layer.head_size)
        value = value.view(-1, kv_heads, layer.head_size_v)
        rows = output.view(-1, heads, layer.head_size_v)
        for start, end, mask in self.blocks:
            attended = F.scaled_dot_product_attention(
                query[start:end].transpose(0, 1)[None],
                key[start:end].transpose(0, 1)[None],
                value[start:end].transpose(0, 1)[None],
                attn_mask=mask,
                scale=layer.impl.scale,
                enable_gqa=kv_heads != heads,
            )
            rows[start:end] = attended[0].transpose(0, 1).to(rows.dtype)
        return output


def check_layer(layer: Attention) -> None:
    """Refuse a layer whose attention the SDPA recompute would not reproduce, or whose attributes moved."""
    missing = [name for name in LAYER_ATTRIBUTES if not hasattr(layer, name)]
    if not hasattr(getattr(layer, "impl", None), "scale"):
        missing.append("impl.scale")
    if missing:
        raise VllmChangedError(f"vllm's Attention layer lacks {', '.join(missing)}")
    impl = layer.impl
    unsupported = [
        what
        for what, present in (
            ("a sliding window", layer.sliding_window is not None),
            ("logit soft-capping", bool(getattr(impl, "logits_soft_cap", None))),
            ("ALiBi", getattr(impl, "alibi_slopes", None) is not None),
            ("attention sinks", bool(getattr(layer, "has_sink", False))),
        )
        if present
    ]
    if unsupported:
        raise ValueError(
            f"segmask: layer {layer.layer_name} uses {' and '.join(unsupported)}, which the MAS prefill does not "
            "reproduce; this model cannot be served with a MAS mask"
        )


def _mas(base: type) -> type:
    """``base`` (a vLLM causal LM) with MAS prefill when its folder asks for a MAS policy."""

    class Mas(base):
        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            settings = settings_for(vllm_config.model_config.model)
            self.segmask: MasPrefill | None = None
            if settings is not None:
                model_config = vllm_config.model_config
                tokenizer = AutoTokenizer.from_pretrained(
                    model_config.tokenizer,
                    revision=model_config.tokenizer_revision,
                    trust_remote_code=model_config.trust_remote_code,
                )
                self.segmask = MasPrefill(self, settings, tokenizer)
                logger.info("segmask: %s prefills under the %s mask", model_config.model, settings.describe())

        def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, *args, **kwargs):
            if self.segmask is not None:
                self.segmask.plan(input_ids)
            return super().forward(input_ids, positions, *args, **kwargs)

    Mas.__name__ = Mas.__qualname__ = f"Mas{base.__name__}"
    Mas.__module__ = __name__
    return Mas


MasLlamaForCausalLM = _mas(LlamaForCausalLM)
MasQwen2ForCausalLM = _mas(Qwen2ForCausalLM)
MasQwen3ForCausalLM = _mas(Qwen3ForCausalLM)
