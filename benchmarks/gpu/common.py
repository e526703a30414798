"""What every step of ``benchmarks/gpu/run.py`` shares: the run (device, sizes, deadline, checks, records),
relative errors, the fast kernel each device is checked with, random layouts and the 1B-shape config.

A check is one line, ``  check NAME: DETAIL: ok`` or ``... FAILED``; a step's result is one line,
``== STEP ok (S s)``, ``== STEP FAILED (n of m checks) (S s)`` or ``== STEP ERROR Type: message (S s)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segmask import kernels

HALF = (torch.float16, torch.bfloat16)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Llama-3.2-1B's config (meta-llama/Llama-3.2-1B, config.json): its speed does not depend on the weights
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    },
)
# the same architecture at the dry run's size (stories260K's tokenizer has 512 tokens)
LLAMA_TINY = dict(
    LLAMA_1B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=16384,
    bos_token_id=1,
    eos_token_id=2,
)
# stories260K's tokenizer with a chat template (as tests/conftest.py gives it), for TRL and chat prompts
STORIES_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class Run:
    """One run of the script: where it runs, how big, until when, and what it found."""

    device: torch.device
    dry: bool
    out: Path
    work: Path
    stories: Path
    deadline: float
    """``time.monotonic()`` after which no new case or cell starts."""
    repeats: int
    """Timed rounds per cell of attention alone."""
    model_repeats: int
    """Timed rounds per cell of the whole model."""
    attention_lengths: list[int]
    model_lengths: list[int]
    step: str = ""
    checks: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    records: dict[str, list[dict]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def has_time(self, what: str, seconds: float = 0.0) -> bool:
        """Whether ``what`` may start (at least ``seconds`` left before the deadline); else says so."""
        if self.time_left() > seconds:
            return True
        self.skip(what, f"the run's time budget is spent ({self.time_left():.0f} s left)")
        return False

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"step": self.step, "name": name, "ok": bool(ok), "detail": detail})
        print(f"  check {name}: {detail}{': ' if detail else ''}{'ok' if ok else 'FAILED'}", flush=True)
        return bool(ok)

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"step": self.step, "what": what, "reason": reason})
        print(f"  skipped {what}: {reason}", flush=True)

    def note(self, text: str) -> None:
        print(f"  {text}", flush=True)

    def record(self, table: str, row: dict) -> None:
        self.records.setdefault(table, []).append(row)

    def write(self, steps: dict[str, dict]) -> None:
        """``results.json`` under ``out``, rewritten after every step (a run stopped early keeps what it did)."""
        results = {
            "info": self.info,
            "steps": steps,
            "checks": self.checks,
            "skipped": self.skipped,
            "records": self.records,
        }
        (self.out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        """Give cached device memory back between cases (each case's peak is its own)."""
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def relative_error(value: torch.Tensor, reference: torch.Tensor, scale: float = 0.0) -> float:
    """``||value - reference|| / ||reference||`` in float64; inf where ``value`` has a NaN or an inf.

    ``scale``: the denominator is at least ``scale * sqrt(numel)``, for tensors whose reference is zero up to
    rounding (the query gradient of a query with one key), where the plain ratio measures only rounding."""
    value, reference = value.double(), reference.double()
    if not bool(torch.isfinite(value).all()):
        return math.inf
    norm = max(reference.norm().item(), scale * math.sqrt(reference.numel()))
    return (value - reference).norm().item() / (norm if norm > 0 else 1.0)


def within(error: float, dense_error: float, floor: float) -> bool:
    """The rule every exactness check uses: a route is exact when its error against the float64 reference
    is at most twice the dense route's own error in the same dtype, plus a floor for the dtype."""
    return error <= 2 * dense_error + floor


# the floor of :func:`within` per dtype: rounding of the dtype, not a bug's size (a wrong mask gives errors
# of order 1)
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}


# ---------------------------------------------------------------------------------------------- kernels


# on CPU (the dry run) the CPU flash operators without their mask stand in for cuda-flash: the plan then
# takes reversed squares, as for cuda-flash (a kernel without a mask), and repeats grouped heads
CPU_STAND_IN = kernels.Kernel(
    "cpu-flash-unmasked", kernels.CPU_FLASH.forward, kernels.CPU_FLASH.backward, "cpu"
)


def fast_kernel(device: torch.device, dtype: torch.dtype) -> kernels.Kernel:
    """The fast path's kernel checked on ``device`` in ``dtype``: cuda-flash for fp16 / bf16 on CUDA, the
    plain-PyTorch reference kernel for float32 there (cuda-flash takes half types only), the CPU stand-in
    on CPU."""
    if device.type == "cuda":
        return kernels.select(device, "cuda-flash" if dtype in HALF else "reference")
    return CPU_STAND_IN


@dataclass
class Counted:
    """A kernel that counts its forward calls: a check whose count stays 0 ran the dense fallback instead."""

    kernel: kernels.Kernel
    calls: int = 0

    def __post_init__(self) -> None:
        def forward(*args, **kwargs):
            self.calls += 1
            return self.kernel.forward(*args, **kwargs)

        inner = self.kernel
        self.counting = kernels.Kernel(
            inner.name, forward, inner.backward, inner.device, masked=inner.masked, grouped=inner.grouped
        )


@contextlib.contextmanager
def default_kernel(kernel: kernels.Kernel, device: torch.device) -> Iterator[None]:
    """Make ``kernel`` the default of ``device``'s type for the fast path (``segmask.kernels.select`` with no
    name), as a model's "segmask" attention asks for it; today no CUDA kernel is a default."""
    original = kernels.select

    def select(where: torch.device, name: str | None = None) -> kernels.Kernel:
        if name is None and torch.device(where).type == device.type:
            return kernel
        return original(where, name)

    kernels.select = select
    try:
        yield
    finally:
        kernels.select = original


# ---------------------------------------------------------------------------------------------- layouts


def random_layout(
    rng: random.Random, max_len: int, max_segment: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """Random rows as ``tests/test_attention_plan.py``'s ``layouts`` strategy draws them: runs of segments
    and causal tokens (ids restarting per document where packed), padding at either end, a cache
    (``q_len`` < ``K``). Returns ``(segment_ids, attention_mask, document_ids, q_len)``, ``[B, K]`` each."""
    batch = rng.randint(1, 3)
    kv_len = rng.randint(1, max_len)
    packed, padded = rng.random() < 0.5, rng.random() < 0.5
    rows, paddings, documents = [], [], []
    for _ in range(batch):
        segment_ids: list[int] = []
        document_ids: list[int] = []
        document, next_segment = 0, 0
        while len(segment_ids) < kv_len:
            if segment_ids and packed and rng.randint(0, 3) == 0:
                document += 1
                next_segment = rng.choice([0, next_segment])
            length = rng.randint(1, max_segment)
            if rng.random() < 0.5:
                segment_ids += [next_segment] * length
                next_segment += 1
            else:
                segment_ids += [-1] * length
            document_ids += [document] * length
        left = rng.randint(0, kv_len)
        right = rng.randint(0, kv_len - left)
        rows.append(segment_ids[:kv_len])
        documents.append(document_ids[:kv_len])
        paddings.append([0] * left + [1] * (kv_len - left - right) + [0] * right)
    q_len = kv_len if rng.random() < 0.5 else rng.randint(1, kv_len)
    return (
        torch.tensor(rows),
        torch.tensor(paddings) if padded else None,
        torch.tensor(documents) if packed else None,
        q_len,
    )


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of segment ids of different lengths, left-padded (padding -1): ``(segment_ids, attention_mask)``."""
    length = max(len(r) for r in rows)
    segment_ids = torch.tensor([[-1] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return segment_ids, attention_mask


def chat_row(rng: random.Random, length: int, turn: tuple[int, int]) -> list[int]:
    """A causal sink, a system segment, then user segments and causal answers of ``turn`` tokens."""
    row, segment = [-1, 0, 0, 0], 1
    while len(row) < length:
        row += [segment] * rng.randint(*turn) + [-1] * rng.randint(*turn)
        segment += 1
    return row[:length]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start
