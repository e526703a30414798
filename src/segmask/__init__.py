"""segmask: segment-based attention masking (MAS) for decoder-only language models.

    >>> import torch, segmask
    >>> segmask.dense_mask(torch.tensor([[0, 0, -1]]))[0, 0].int().tolist()
    [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
"""

from segmask.masks import POLICIES, MaskPolicy, attention_bias, block_mask, dense_mask, mask_function

__all__ = [
    "POLICIES",
    "MaskPolicy",
    "attention_bias",
    "block_mask",
    "dense_mask",
    "mask_function",
]
__version__ = "0.1.0"
