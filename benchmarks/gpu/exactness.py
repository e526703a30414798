"""Exactness on the device: every MAS route against SDPA with the dense mask in float64, output and gradients.

Attention alone (``q [B, Hq, Q, D]``, grouped ``k, v``), in each dtype:
    fast    segmask's fast path (:func:`segmask.fast_attention.mas_attention`) on the kernel of
            :func:`common.fast_kernel` (cuda-flash in fp16 / bf16), its kernel calls counted so that a silent
            dense fallback cannot pass
    eager   transformers' ``eager_attention_forward`` with the additive mask (:func:`segmask.masks.to_additive`)
    flex    ``flex_attention`` compiled, with :func:`segmask.masks.block_mask`
over random layouts (packed, padded, a cache), a left-padded batch, a KV-cache continuation (``Q < K``),
``benchmarks/attention.py``'s check of the prompt / chat / few-shot layouts, and the sliding-window layer's
dense route. Then whole (tiny, random) models through ``segmask.enable`` on every attention implementation:
a Llama (the fast path) and a Mistral with a sliding window (the dense fallback), logits and all parameter
gradients of a left-padded batch, and a prefill continued on its KV cache (``segmask.generation.prefill``).

The rule (:func:`common.within`): a route's relative error against float64 is at most twice the dense SDPA
route's in the same dtype, plus a floor for the dtype.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import traceback

import attention as attention_bench  # benchmarks/attention.py
import torch
import torch.nn.functional as F
from common import (
    FLOOR,
    Counted,
    Run,
    chat_row,
    default_kernel,
    fast_kernel,
    left_padded,
    random_layout,
    relative_error,
    within,
)
from torch.nn.attention.flex_attention import flex_attention

from segmask import fast_attention, hook, masks
from segmask.attention_plan import Layout, plan_layout

ROUTES = ("fast", "eager", "flex")
UNIT = 1e-2
"""Attention's inputs are unit normal: a tensor whose reference is much smaller than ``UNIT`` per entry is
zero up to rounding, and its error is measured against ``UNIT`` (:func:`common.relative_error`)."""
_FLEX = {}


def compiled_flex():
    """``flex_attention`` compiled once (dynamic=False: one graph per shape and dtype)."""
    if "flex" not in _FLEX:
        _FLEX["flex"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["flex"]


class _Module(torch.nn.Module):
    """What transformers' attention functions read from their module."""

    def __init__(self, groups: int, sliding_window: int | None = None):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.sliding_window = groups, True, sliding_window
        self.training = False


def attention_case(
    run: Run,
    name: str,
    dtype: torch.dtype,
    segment_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    q_len: int,
    routes: tuple[str, ...],
    heads: tuple[int, int] = (8, 2),
    head_dim: int = 64,
    seed: int = 0,
) -> None:
    """One layout: each route in ``dtype`` and dense SDPA in ``dtype`` against dense SDPA in float64."""
    device = run.device
    seg = segment_ids.to(device)
    pad = None if attention_mask is None else attention_mask.to(device)
    doc = None if document_ids is None else document_ids.to(device)
    batch, kv_len = seg.shape
    generator = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads[0], q_len, head_dim, generator=generator, device=device)
    k, v = (torch.randn(batch, heads[1], kv_len, head_dim, generator=generator, device=device) for _ in "kv")
    real = (
        torch.ones(batch, q_len, dtype=torch.bool, device=device) if pad is None else pad[:, -q_len:].bool()
    )
    # padded queries: outputs undefined (SDPA attends them to themselves, flex to nothing), so no gradient
    grad = torch.randn(q.shape, generator=generator, device=device) * real[:, None, :, None]
    mask = masks.sdpa_mask(seg, pad, doc, q_len=q_len)

    def outputs(fn, in_dtype: torch.dtype, backward: bool = True) -> list[torch.Tensor]:
        leaves = [t.to(in_dtype, copy=True).requires_grad_(backward) for t in (q, k, v)]  # fresh leaves
        out = fn(*leaves)
        if not backward:
            return [out.detach()]
        out.backward(grad.to(in_dtype))
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    def error(result: list[torch.Tensor]) -> float:
        rows = [lambda t: t.transpose(1, 2)[real], lambda t: t.transpose(1, 2)[real], None, None]
        return max(
            relative_error(pick(a) if pick else a, pick(b) if pick else b, UNIT)
            for pick, a, b in zip(rows, result, reference)
        )

    def dense(*t):
        return F.scaled_dot_product_attention(*t, attn_mask=mask, enable_gqa=True)

    reference = outputs(dense, torch.float64)
    dense_result = outputs(dense, dtype)
    dense_error = error(dense_result)
    label = f"attention {name} {str(dtype).removeprefix('torch.')}"
    for route in routes:
        backward = True
        if route == "fast":
            counted = Counted(fast_kernel(device, dtype))
            planned = plan_layout(seg, pad, doc, q_len) is not None
            band = fast_attention.BAND if counted.kernel.masked else 0
            expected = (
                Layout(seg, pad, doc).calls(q_len, fast_attention.PIECE, band).count() if planned else 0
            )

            def fn(*t, counted=counted):
                return fast_attention.mas_attention(*t, seg, pad, doc, kernel=counted.counting)

        elif route == "eager":
            additive = masks.to_additive(masks.dense(seg, pad, doc, q_len), dtype)

            def fn(*t, additive=additive):
                from transformers.models.llama.modeling_llama import eager_attention_forward

                out, _ = eager_attention_forward(
                    _Module(heads[0] // heads[1]), *t, additive, scaling=head_dim**-0.5
                )
                return out.transpose(1, 2)

        else:
            block = masks.block_mask(seg, pad, doc, q_len=q_len)
            backward = run.cuda  # FlexAttention has no backward on CPU

            def fn(*t, block=block):
                return compiled_flex()(*t, block_mask=block, enable_gqa=True)

        result = outputs(fn, dtype, backward)
        if backward:
            route_error = error(result)
        else:  # the output alone
            route_error = relative_error(
                result[0].transpose(1, 2)[real], reference[0].transpose(1, 2)[real], UNIT
            )
        # flex's float32 dots may run as tf32 (Triton's default where matmuls allow it): about 3e-4
        floor = 1e-3 if route == "flex" and dtype == torch.float32 else FLOOR[dtype]
        detail = f"error {route_error:.2e} (dense SDPA {dense_error:.2e}, floor {floor:.0e})"
        ok = within(route_error, dense_error, floor)
        if route == "fast":
            detail += f", {counted.calls} {counted.kernel.name} calls"
            # the fast path ran (its kernel was called wherever the plan has calls), not the dense fallback
            ok = ok and planned and (counted.calls > 0 or expected == 0)
        if not backward:
            detail += ", forward only (no flex backward on CPU)"
        run.check(f"{label} {route}", ok, detail)
    run.free()


def sliding_window_case(run: Run, dtype: torch.dtype, length: int, window: int) -> None:
    """A sliding-window layer under "segmask" takes the dense route, with its window, exactly."""
    device = run.device
    seg, pad = left_padded([chat_row(random.Random(1), n, (3, 40)) for n in (length, length - 17)])
    seg, pad = seg.to(device), pad.to(device)
    generator = torch.Generator(device=device).manual_seed(2)
    q = torch.randn(2, 8, length, 64, generator=generator, device=device)
    k, v = (torch.randn(2, 2, length, 64, generator=generator, device=device) for _ in "kv")
    real = pad.bool()
    function = masks.and_masks(masks.mask_function(seg, pad), masks.window_function(window))
    mask = masks.never_empty(masks.evaluate(function, 2, length, length, device))

    def reference(*t):
        return F.scaled_dot_product_attention(*t, attn_mask=mask, enable_gqa=True).transpose(1, 2)

    expected = reference(*(t.double() for t in (q, k, v)))
    dense_error = relative_error(reference(*(t.to(dtype) for t in (q, k, v)))[real], expected[real])
    module = _Module(4, sliding_window=window)
    out, _ = hook.segmask_attention_forward(
        module, *(t.to(dtype) for t in (q, k, v)), None, segmask_layout=Layout(seg, pad)
    )
    error = relative_error(out[real], expected[real])
    run.check(
        f"attention sliding-window {str(dtype).removeprefix('torch.')} segmask",
        within(error, dense_error, FLOOR[dtype]),
        f"window {window}: error {error:.2e} (dense SDPA {dense_error:.2e})",
    )


def cuda_flash_refuses_float32(run: Run) -> None:
    """cuda-flash takes fp16 / bf16 only: float32 inputs are refused with a ValueError, not run wrongly."""
    q = torch.randn(1, 2, 8, 64, device=run.device)
    try:
        segment_ids = torch.zeros(1, 8, dtype=torch.long, device=run.device)
        fast_attention.mas_attention(q, q, q, segment_ids, kernel="cuda-flash")
    except ValueError as error:
        run.check("attention cuda-flash float32", True, f"refused: {error}")
    else:
        run.check("attention cuda-flash float32", False, "ran on float32 inputs")


# ------------------------------------------------------------------------------------------ whole models


def tiny_config(kind: str, dry: bool, window: int):
    import transformers

    size = (
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16)
        if dry
        else dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, head_dim=32)
    )
    common = dict(num_hidden_layers=2, num_key_value_heads=2, vocab_size=512, **size)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    return transformers.MistralConfig(sliding_window=window, **common)


def model_inputs(length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    seg, pad = left_padded([chat_row(rng, length, (4, 30)), chat_row(rng, length - 23, (4, 30))])
    ids = torch.randint(3, 512, seg.shape, generator=torch.Generator().manual_seed(seed)) * pad
    return {"input_ids": ids, "segment_ids": seg, "attention_mask": pad}


def boundary(segment_ids: torch.Tensor) -> int:
    """A cut near two thirds of the rows where no segment continues across (a cache may end there)."""
    length = segment_ids.shape[1]
    for cut in range(2 * length // 3, length):
        before, after = segment_ids[:, cut - 1], segment_ids[:, cut]
        if not bool(((before >= 0) & (after == before)).any()):
            return cut
    raise ValueError("no segment boundary in the last third of the rows")


def model_case(run: Run, kind: str, dtypes: list[torch.dtype], implementations: tuple[str, ...]) -> None:
    """A tiny random model on ``implementations`` and on dense ``sdpa``, in each dtype, against the float64
    dense route: logits, every parameter's gradient, and a prefill continued on its KV cache."""
    import segmask
    from segmask.generation import prefill

    length = 48 if run.dry else 192
    config = tiny_config(kind, run.dry, window=length // 4)
    torch.manual_seed(0)
    hook.register()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    inputs = {k: v.to(run.device) for k, v in model_inputs(length).items()}
    real = inputs["attention_mask"].bool()
    cut = boundary(inputs["segment_ids"].cpu())
    targets = torch.randint(0, 512, real.shape, generator=torch.Generator().manual_seed(1)).to(run.device)

    def build(implementation: str, dtype: torch.dtype):
        model = copy.deepcopy(base).to(device=run.device, dtype=dtype)
        model.set_attn_implementation(implementation)
        return segmask.enable(model, fast=False)  # the implementation as set: sdpa stays the dense route

    def forward_backward(model) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        logits = model(**inputs).logits
        picked = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        (-picked[real].mean()).backward()
        grads = torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])
        return logits.detach()[real], grads

    @torch.no_grad()
    def continued(model) -> torch.Tensor:
        """A prefill of the rows up to ``cut``, continued on its KV cache: the logits of every token."""
        first, cache = prefill(
            model,
            inputs["input_ids"][:, :cut],
            inputs["segment_ids"][:, :cut],
            inputs["attention_mask"][:, :cut],
        )
        rest, _ = prefill(
            model,
            inputs["input_ids"][:, cut:],
            inputs["segment_ids"][:, cut:],
            inputs["attention_mask"],
            cache,
        )
        return torch.cat([first, rest], dim=1)[real]

    reference = build("sdpa", torch.float64)
    ref_logits, ref_grads = forward_backward(reference)
    with torch.no_grad():
        ref_whole = prefill(reference, inputs["input_ids"], inputs["segment_ids"], inputs["attention_mask"])[
            0
        ]
    ref_whole = ref_whole[real]
    del reference
    floors = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        if not run.has_time(f"model {kind} {name} {' '.join(implementations)}", 10):
            return
        errors: dict[str, tuple[float, float, float]] = {}
        for implementation in ("sdpa", *implementations):
            check = f"model {kind} {name} {implementation}"
            kernel = Counted(fast_kernel(run.device, dtype))
            try:
                with default_kernel(kernel.counting, run.device):
                    model = build(implementation, dtype)
                    logits, grads = forward_backward(model)
                    logit_error, grad_error = (
                        relative_error(logits, ref_logits),
                        relative_error(grads, ref_grads),
                    )
                    cont_error = float("nan")  # flex refuses a sliding-window cache
                    if implementation != "flex_attention" or kind == "llama":
                        cont_error = relative_error(continued(model), ref_whole)
            except Exception as error:  # noqa: BLE001 - a route that raises is a finding, the others go on
                traceback.print_exc(file=sys.stdout)
                run.check(check, False, f"raised {type(error).__name__}: {str(error).splitlines()[0][:300]}")
                if implementation == "sdpa":
                    return
                continue
            finally:
                model = None
                run.free()
            errors[implementation] = (logit_error, grad_error, cont_error)
            if implementation == "sdpa":
                continue
            dense = errors["sdpa"]
            ok = all(within(e, d, floors[dtype]) for e, d in zip(errors[implementation], dense) if e == e)
            detail = (
                f"logits {logit_error:.2e}, gradients {grad_error:.2e}, cache continuation {cont_error:.2e} "
                f"(dense sdpa {dense[0]:.2e}, {dense[1]:.2e}, {dense[2]:.2e})"
            )
            if implementation == "segmask":
                if kind == "llama":  # the fast path ran
                    ok = ok and kernel.calls > 0
                    detail += f", {kernel.calls} {kernel.kernel.name} calls"
                else:  # every layer slides: the dense route with the window, never the fast kernel
                    ok = ok and kernel.calls == 0
                    detail += ", sliding window: the dense route"
            run.check(check, ok, detail)


# ------------------------------------------------------------------------------------------------- step


def main(run: Run, dtypes: list[torch.dtype], flex_dtypes: list[torch.dtype], layouts: int) -> None:
    """Cheap cases first (no compiling), then whole models, then flex (compiled per shape and dtype)."""
    rng = random.Random(0)
    big = (96, 24) if run.dry else (1536, 400)
    length = 96 if run.dry else 1024
    seg, pad = left_padded(
        [chat_row(random.Random(3), n, (4, 400)) for n in (length, length - 37, length // 2)]
    )
    cut = 2 * length // 3  # the mask defines any cut (a whole model needs a segment boundary)
    saved_piece = fast_attention.PIECE
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        if run.cuda and dtype == torch.float32:
            cuda_flash_refuses_float32(run)
        # random layouts at the real piece (blocks and squares), then at a piece of 8 (many small calls)
        for index in range(layouts):
            if not run.has_time(f"random layouts {name} {index}", 3):
                break
            small = index % 2 == 1
            fast_attention.PIECE = 8 if small else saved_piece
            try:
                layout = random_layout(rng, *((48, 12) if small else big))
                attention_case(run, f"random {index}{' piece 8' if small else ''}", dtype, *layout, ("fast",))
            finally:
                fast_attention.PIECE = saved_piece
        if run.has_time(f"left padding {name}", 5):
            attention_case(run, "left-padded", dtype, seg, pad, None, length, ("fast", "eager"))
        if run.has_time(f"cache continuation {name}", 5):
            attention_case(
                run, f"cache {cut}+{length - cut}", dtype, seg, pad, None, length - cut, ("fast", "eager")
            )
        if run.has_time(f"sliding window {name}", 3):
            sliding_window_case(run, dtype, 64 if run.dry else 512, 16 if run.dry else 128)
        # benchmarks/attention.py's own check (as --check-only runs it), at a real length
        args = argparse.Namespace(
            batch=2,
            heads=8,
            head_dim=64,
            device=run.device.type,
            dtype=dtype,
            kernel=fast_kernel(run.device, dtype),
        )
        for layout in attention_bench.LAYOUTS:
            if run.has_time(f"attention.py check {layout} {name}", 5):
                passed = attention_bench.check(args, layout, 256 if run.dry else 4096)
                run.check(f"attention.py --check-only {layout} {name}", passed, args.kernel.name)
        run.free()
    for kind in ("llama", "mistral"):
        model_case(run, kind, dtypes, ("segmask", "eager"))
    # flex, compiled: one graph per shape and dtype (tens of seconds each on the device)
    for dtype in flex_dtypes:
        name = str(dtype).removeprefix("torch.")
        if run.has_time(f"left padding {name} flex", 20):
            attention_case(run, "left-padded", dtype, seg, pad, None, length, ("flex",))
        if dtype == torch.bfloat16 and run.has_time(f"cache continuation {name} flex", 20):
            attention_case(run, f"cache {cut}+{length - cut}", dtype, seg, pad, None, length - cut, ("flex",))
    if not run.cuda:
        run.skip(
            "model flex_attention", "transformers' compiled flex is left to the device run (no CPU backward)"
        )
    elif torch.bfloat16 in flex_dtypes:  # transformers compiles flex per shape: llama in bf16 only
        model_case(run, "llama", [torch.bfloat16], ("flex_attention",))
