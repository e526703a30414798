"""Generation on the device: ``segmask.generate`` greedy under ``mas`` on stories260K, against the CPU.

The same call (two conversations and a raw prompt of different lengths, so left-padded, float32) on the
CPU and on the device must give the same token ids. Then, for information (not a check: greedy tokens of
two roundings may part), the fast kernel made the device's default in bfloat16 against the dense route in
bfloat16 on the device.
"""

from __future__ import annotations

import torch
from common import STORIES_CHAT_TEMPLATE, Run, default_kernel, fast_kernel

PROMPTS = [
    [
        {"role": "system", "content": "Tell short stories."},
        {"role": "user", "content": "What did Lily see in the park?"},
    ],
    [
        {"role": "user", "content": "Tom had a red ball."},
        {"role": "assistant", "content": "Tom played with the ball all day."},
        {"role": "user", "content": "What happened next?"},
    ],
    "Once upon a time, there was a little girl named Sue. She",
]


def completions(run: Run, device: torch.device, dtype: torch.dtype, new_tokens: int, fast: bool = False):
    """Token ids of ``segmask.generate`` on ``device`` in ``dtype``; ``fast``: the fast kernel is the default
    there (else the device's own default: the dense fallback on CUDA, where no kernel is a default)."""
    from segmask.generation import generate
    from segmask.loading import load_model

    model, tokenizer, _ = load_model(
        run.stories, dtype=dtype, device=device, chat_template=STORIES_CHAT_TEMPLATE
    )
    if not fast:
        result = generate(model, tokenizer, PROMPTS, policy="mas", max_new_tokens=new_tokens, do_sample=False)
    else:
        with default_kernel(fast_kernel(device, dtype), device):
            result = generate(
                model, tokenizer, PROMPTS, policy="mas", max_new_tokens=new_tokens, do_sample=False
            )
    return [c.token_ids for c in result], model.config._attn_implementation


def main(run: Run) -> None:
    new_tokens = 16 if run.dry else 48
    expected, implementation = completions(run, torch.device("cpu"), torch.float32, new_tokens)
    got, _ = completions(run, run.device, torch.float32, new_tokens)
    for row, (a, b) in enumerate(zip(expected, got)):
        same = sum(x == y for x, y in zip(a, b))
        run.check(
            f"generate {run.device.type} float32 row {row}",
            a == b,
            f"{implementation}, {len(b)} tokens, {same} equal to the CPU's",
        )
    run.note(f"CPU tokens: {expected}")
    dtype = torch.bfloat16
    fast, _ = completions(run, run.device, dtype, new_tokens, fast=True)
    dense, _ = completions(run, run.device, dtype, new_tokens)
    agree = [sum(x == y for x, y in zip(a, b)) for a, b in zip(fast, dense)]
    run.note(
        f"bfloat16, {fast_kernel(run.device, dtype).name} as the default against the device's default route "
        f"({'the dense fallback' if run.cuda else 'cpu-flash'}): tokens equal per row {agree} of "
        f"{[len(r) for r in dense]} (information, not a check)"
    )
