"""segmask: segment-based attention masking (MAS) for decoder-only language models.

    >>> import torch, segmask
    >>> segmask.dense_mask(torch.tensor([[0, 0, -1]]))[0, 0].int().tolist()
    [[1, 1, 0], [1, 1, 0], [1, 1, 1]]

Public names are imported lazily, so ``import segmask`` stays cheap (no transformers import until used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "POLICIES": "policies",
    "MaskPolicy": "policies",
    "attention_bias": "masks",
    "block_mask": "masks",
    "dense_mask": "masks",
    "draw": "masks",
    "mask_function": "masks",
    "enable": "hook",
    "disable": "hook",
    "NotEnabledError": "guard",
    "ContextOverflowError": "hook",
    "Encoded": "segments",
    "encode_chat": "segments",
    "encode_instruction": "segments",
    "Collator": "collate",
    "load_model": "loading",
    "generate": "generation",
    "ChatSession": "chat",
    "stream": "generation",
    "TrainConfig": "train_config",
    "train": "training",
    "EvalConfig": "eval_config",
    "evaluate": "evaluation",
    "compare_runs": "compare",
    "leak_check": "leaks",
    "serve": "serving",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"segmask.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'segmask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
