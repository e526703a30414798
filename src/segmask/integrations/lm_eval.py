"""lm-evaluation-harness backend ``segmask``: any harness task under a mask policy.

    python -m segmask.integrations.lm_eval --model segmask --model_args pretrained=PATH,mask=mas --tasks arc_easy

``python -m segmask.integrations.lm_eval`` is the ``lm_eval`` command line with this backend registered:
lm_eval 0.4.13 resolves ``--model`` in its own registry only (it reads no entry points and has no option to
import a module), so plain ``lm_eval --model segmask`` works only in a process that has imported
``segmask.integrations.lm_eval``. From Python::

    import lm_eval, segmask.integrations.lm_eval  # registers "segmask"
    lm_eval.simple_evaluate(model="segmask", model_args="pretrained=PATH,mask=mas", tasks=[...])

Requests map onto MAS like this:

    loglikelihood          the context is the prompt: one bidirectional segment (``mas``, ``prefix``), or
                           one segment per turn when lm_eval rendered it with ``--apply_chat_template``;
                           it is prefilled once for all its continuations, which are scored causally.
    loglikelihood_rolling  a document has no prompt: every token is causal, under every policy.
    generate_until         the context is prefilled under its segments, the answer decoded causally
                           (:func:`segmask.generation.generate_ids`), and cut at the first stop string.

``model_args``: ``pretrained`` (a path :func:`segmask.loading.load` reads), ``mask`` (``causal``, ``mas``,
``prefix``; default: the model's own), ``causal_sink`` (``true``: token 0 causal under ``mas`` and ``prefix``,
:func:`segmask.segments.sink_segments`; default: the model's run value, else the policy's default,
:func:`segmask.policies.sink_on`: on under ``mas``), ``batch_size`` (prompts per
generate call), ``max_length`` (default: the model's context), ``add_bos_token`` (default: whatever the
tokenizer does), ``dtype``, ``device``, ``template`` (``alpaca`` or ``paper``: a plain context is the
``instruction`` of an LLM-Adapters record, prompted in that template with its segments, :mod:`segmask.templates`
-- ``paper`` gives the official evaluation prompt and `` ###`` blocks; default ``none``: the context as raw
text, one segment). The continuation is scored as lm_eval tokenized it after the raw context. A context cut
from the left to fit ``max_length`` keeps the sink: its new token 0 is made causal.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import torch
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from segmask.generation import completion, eos_token_ids, generate_ids, left_pad, pad_token_id
from segmask.loading import load
from segmask.policies import sink_on
from segmask.scoring import continuation_logprobs
from segmask.segments import (
    IGNORE_INDEX,
    Encoded,
    encode_chat,
    encode_instruction,
    encode_tokens,
    sink_segments,
)
from segmask.templates import check_template

NAME = "segmask"
logger = logging.getLogger(__name__)


class SegmaskLM(TemplateLM):
    """A :func:`segmask.load_model` model behind lm_eval's ``LM`` interface (see the module docstring)."""

    def __init__(
        self,
        pretrained: str,
        mask: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        dtype: str = "float32",
        device: str | None = None,
        causal_sink: bool | str | None = None,
        template: str | None = None,
        **_unused,
    ) -> None:
        super().__init__()
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        model, tokenizer, settings = load(
            pretrained,
            policy=mask,
            causal_sink=_flag(causal_sink, "causal_sink"),
            dtype=torch_dtype,
            device=_device(device),
        )
        self.model, self.tokenizer = model, tokenizer
        self.policy, self.causal_sink = settings.policy, settings.causal_sink
        # None/"none": a plain context is raw text (one segment); alpaca/paper: it is an instruction
        self.template = None if template in (None, "", "none") else check_template(template)
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self._max_length = int(max_length) if max_length else _context_length(model, tokenizer)
        bos = tokenizer.bos_token_id
        if add_bos_token is None:
            add_bos_token = bos is not None and tokenizer("a").input_ids[:1] == [bos]
        self.add_bos_token = bool(add_bos_token) and bos is not None
        self._chats: dict[str, tuple[list[dict], bool]] = {}  # rendered chat -> (messages, generation prompt)

    # ---- what lm_eval asks of a model ----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render the chat as text for lm_eval and remember its turns, so its segments can be rebuilt."""
        rendered = self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        self._chats[rendered] = ([dict(m) for m in chat_history], add_generation_prompt)
        return rendered

    # ---- prompts ---------------------------------------------------------------------------------

    def prompt(self, context: str, context_ids: Sequence[int]) -> Encoded:
        """The context as a prompt under the policy: its chat turns if lm_eval rendered a chat; with
        ``template`` the instruction of a record in that template; else one segment."""
        chat = self._chats.get(context)
        if chat is not None:
            return encode_chat(
                self.tokenizer,
                chat[0],
                policy=self.policy,
                add_generation_prompt=chat[1],
                causal_sink=self.causal_sink,
            )
        if self.template is not None:
            record = {"instruction": context, "input": ""}
            return encode_instruction(
                self.tokenizer, record, policy=self.policy, include_answer=False,
                causal_sink=self.causal_sink, template=self.template,
            )  # fmt: skip
        ids = list(context_ids)
        if self.add_bos_token and ids[:1] != [self.tokenizer.bos_token_id]:
            ids = [self.tokenizer.bos_token_id, *ids]
        return encode_tokens(ids, self.policy, causal_sink=self.causal_sink)

    def _fit(self, prompt: Encoded, longest: int) -> tuple[list[int], list[int]]:
        """Drop the prompt's oldest tokens so that prompt plus the longest continuation fit ``max_length``;
        with ``causal_sink`` the first token kept becomes the sink (causal), as the cut one was."""
        if longest >= self.max_length:
            raise ValueError(
                f"a continuation of {longest} tokens does not fit the context of {self.max_length}"
            )
        keep = self.max_length - longest
        ids, segments = prompt.input_ids[-keep:], prompt.segment_ids[-keep:]
        if sink_on(self.policy, self.causal_sink) and len(ids) < len(prompt.input_ids):
            segments = sink_segments(segments)
        return ids, segments

    # ---- requests --------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Score ``((context, continuation), context_ids, continuation_ids)`` requests, one prefill per context."""
        groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for position, ((context, _), context_ids, _) in enumerate(requests):
            groups.setdefault((context, tuple(context_ids)), []).append(position)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for (context, context_ids), positions in tqdm(
            groups.items(), desc="loglikelihood", disable=disable_tqdm
        ):
            continuations = [requests[p][2] for p in positions]
            ids, segments = self._fit(self.prompt(context, context_ids), max(len(c) for c in continuations))
            scores = continuation_logprobs(self.model, ids, segments, continuations)
            for position, score in zip(positions, scores):
                results[position] = (score.logprob, score.is_greedy)
                self.cache_hook.add_partial("loglikelihood", requests[position][0], results[position])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in disjoint windows of ``max_length``, every token causal."""
        results = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            total = 0.0
            for context_ids, predicted in map(make_disjoint_window, windows):
                (score,) = continuation_logprobs(
                    self.model, context_ids, [-1] * len(context_ids), [predicted]
                )
                total += score.logprob
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task asks) continuations after a MAS prefill, cut at the stop strings."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with equal generation settings share generate calls
        for position, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(position)
        pad_id, stops = pad_token_id(self.tokenizer), eos_token_ids(self.model, self.tokenizer)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for positions in groups.values():
            settings = dict(requests[positions[0]].args[1])
            until = _stop_strings(settings.pop("until", None), self.tok_decode([self.eot_token_id]))
            max_new_tokens = int(settings.pop("max_gen_toks", 256))
            generation_kwargs = {
                **_generation_kwargs(settings),
                "max_new_tokens": max_new_tokens,
                "pad_token_id": pad_id,
            }
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start : start + self.batch_size]
                prompts = []
                for position in chunk:
                    context = requests[position].args[0]
                    ids, segments = self._fit(self.prompt(context, self.tok_encode(context)), max_new_tokens)
                    prompts.append(Encoded(ids, segments, [IGNORE_INDEX] * len(ids)))
                batch = left_pad(prompts, pad_id)
                sequences = generate_ids(self.model, **batch, **generation_kwargs)
                for position, row in zip(chunk, sequences[:, batch["input_ids"].shape[1] :]):
                    results[position] = _cut(completion(self.tokenizer, row.tolist(), stops).text, until)
                    self.cache_hook.add_partial("generate_until", requests[position].args, results[position])
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]


def _device(requested: str | None) -> str:
    """The device to run on: lm_eval asks for ``cuda`` by default, which falls back to the CPU without a GPU."""
    if requested in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(requested).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available; running on the CPU", requested)
        return "cpu"
    return str(requested)


def _flag(value: bool | str | None, name: str) -> bool | None:
    """A boolean model argument: lm_eval passes ``true``/``false`` as booleans, a direct caller maybe text."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _context_length(model, tokenizer) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    length = getattr(tokenizer, "model_max_length", None)
    return length if isinstance(length, int) and 0 < length < 10**7 else 2048


def _stop_strings(until: str | Sequence[str] | None, eos_text: str) -> list[str]:
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)):
        raise ValueError(f"generation 'until' must be a string or a list of strings, got {until!r}")
    return [*until, eos_text] if eos_text else list(until)


def _generation_kwargs(settings: dict) -> dict:
    """lm_eval's generation settings as transformers ``generate`` arguments (greedy unless sampling is asked)."""
    do_sample = bool(settings.pop("do_sample", False))
    temperature = float(settings.pop("temperature", 1.0 if do_sample else 0.0))
    if temperature == 0.0:
        do_sample = False
    kwargs = {"do_sample": do_sample, "num_beams": int(settings.pop("num_beams", 1))}
    if do_sample:
        kwargs["temperature"] = temperature
        for name in ("top_p", "top_k"):
            if name in settings:
                kwargs[name] = settings.pop(name)
    return kwargs


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def register() -> None:
    """Register :class:`SegmaskLM` as ``"segmask"`` with lm_eval (idempotent; done on import)."""
    if NAME not in model_registry:
        register_model(NAME)(SegmaskLM)


register()


def main(argv: list[str] | None = None) -> None:
    """The ``lm_eval`` command line, with the ``segmask`` backend registered."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
