"""The perturbation test for leaks: tokens after a cut that no segment spans must not change earlier logits.

A mask that lets a token see the future gives spectacular and fake gains, so every fine-tuned model is put
through :func:`leak_check` before its numbers are reported (the demo and both experiments do this)::

    from segmask.leaks import leak_check
    leak_check(segmask.enable(model), segmask.encode_chat(tokenizer, messages, policy="mas"))
"""

from __future__ import annotations

import torch
from torch import nn

from segmask import masks
from segmask.hook import require_enabled
from segmask.segments import Encoded


@torch.no_grad()
def leak_check(
    model: nn.Module, encoded: Encoded, max_cuts: int = 6, seed: int = 0, tolerance: float = 1e-4
) -> float:
    """The perturbation test on a (fine-tuned) model: future tokens must not change earlier logits.

    For up to ``max_cuts`` cuts inside the sequence (:func:`segmask.masks.cuts`: every segment boundary first, then causal positions),
    the tokens from the cut on are replaced by other random ids and the model is run again with the same
    ``segment_ids``; the logits ``[c, V]`` before the cut must stay within ``tolerance``. Returns the largest
    change seen and raises a ``ValueError`` naming the cut if it exceeds ``tolerance``. ``model`` must have
    gone through :func:`segmask.enable`; it runs in eval mode (dropout off) and is put back as it was.
    """
    require_enabled(model, torch.tensor(encoded.segment_ids))
    cuts = [c for c in masks.cuts(encoded.segment_ids) if c < len(encoded)]
    if not cuts:
        raise ValueError("no cut to test: the example is a single bidirectional segment")
    was_training = model.training
    model.eval()
    try:
        return _largest_change(model, encoded, cuts, max_cuts, seed, tolerance)
    finally:
        model.train(was_training)


def _largest_change(
    model: nn.Module, encoded: Encoded, cuts: list[int], max_cuts: int, seed: int, tolerance: float
) -> float:
    boundaries = [c for c in cuts if encoded.segment_ids[c - 1] >= 0]
    causal = [c for c in cuts if encoded.segment_ids[c - 1] < 0]
    step = max(1, len(causal) // max(1, max_cuts - len(boundaries)))
    chosen = (boundaries + causal[::step])[:max_cuts]
    device = model.device
    ids = torch.tensor([encoded.input_ids], device=device)
    segments = torch.tensor([encoded.segment_ids], device=device)
    reference = model(input_ids=ids, segment_ids=segments).logits.float()
    vocab = reference.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for cut in chosen:
        shift = torch.randint(1, vocab, (ids.shape[1] - cut,), generator=generator).to(device)
        perturbed = ids.clone()
        perturbed[0, cut:] = (ids[0, cut:] + shift) % vocab
        logits = model(input_ids=perturbed, segment_ids=segments).logits.float()
        change = float((logits[0, :cut] - reference[0, :cut]).abs().max())
        worst = max(worst, change)
        if change > tolerance:
            raise ValueError(
                f"leak: changing the tokens from position {cut} on moved an earlier logit by {change:.3g} "
                f"(tolerance {tolerance}); the mask lets a token see the future"
            )
    return worst
