"""segmask.integrations.lm_eval: the "segmask" lm-evaluation-harness model, offline on local task YAMLs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from transformers import AutoModelForCausalLM

from segmask.generation import generate
from segmask.integrations.lm_eval import SegmaskLM, _cut
from segmask.segments import encode_chat

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TASKS = ("segmask_boolq_mc", "segmask_boolq_gen", "segmask_boolq_rolling")
CONTEXT = "Please answer the following question with true or false, question: is the sky blue?\n\nAnswer:"


@pytest.fixture(scope="module")
def task_dir(commonsense_dir, tmp_path_factory) -> Path:
    """The fixture YAMLs with the absolute path of ../shared/data/commonsense filled in."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for template in (FIXTURES / "lm_eval").glob("*.yaml"):
        text = template.read_text().replace("@COMMONSENSE@", str(commonsense_dir.resolve()))
        (folder / template.name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def lm(stories_path) -> SegmaskLM:
    """The paper's mask: token 0 (the BOS) in segment 0."""
    return SegmaskLM(pretrained=str(stories_path), mask="mas", causal_sink=False, device="cpu")


@pytest.fixture(scope="module")
def plain(stories_path):
    return AutoModelForCausalLM.from_pretrained(stories_path)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, arguments, index) for index, arguments in enumerate(args)]


@contextmanager
def _chatml(lm: SegmaskLM):
    """``lm``'s tokenizer with SmolLM2's ChatML template (no BOS), restored afterwards."""
    previous = lm.tokenizer.chat_template
    lm.tokenizer.chat_template = (FIXTURES / "chat_templates" / "chatml_smollm2.jinja").read_text()
    try:
        yield
    finally:
        lm.tokenizer.chat_template = previous


MESSAGES = [
    {"role": "system", "content": "Answer true or false."},
    {"role": "user", "content": "Is ice cold?"},
]


@torch.inference_mode()
def _logprob(model, ids: list[int], start: int, **kwargs) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, from one forward pass without a cache."""
    logits = model(torch.tensor([ids]), **kwargs).logits[0].float()
    logprobs = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logprobs[start - 1 :].sum())


def test_registered_under_segmask():
    assert get_model("segmask") is SegmaskLM


def test_loglikelihood_context_is_one_prompt_segment(lm, stories_path):
    continuations = [" true", " false"]
    results = lm.loglikelihood(
        _requests("loglikelihood", [(CONTEXT, c) for c in continuations]), disable_tqdm=True
    )
    causal = SegmaskLM(pretrained=str(stories_path), mask="causal", device="cpu")
    causal_results = causal.loglikelihood(
        _requests("loglikelihood", [(CONTEXT, c) for c in continuations]), True
    )
    bos = lm.tokenizer.bos_token_id
    for continuation, (logprob, _), (causal_logprob, _) in zip(continuations, results, causal_results):
        context_ids, continuation_ids = lm._encode_pair(CONTEXT, continuation)
        ids = [bos, *context_ids, *continuation_ids]
        prompt = len(context_ids) + 1
        segments = torch.tensor([[0] * prompt + [-1] * len(continuation_ids)])
        # BOS and context: one bidirectional segment; the continuation: causal
        assert logprob == pytest.approx(_logprob(lm.model, ids, prompt, segment_ids=segments), abs=1e-4)
        # mask=causal is the plain model
        assert causal_logprob == pytest.approx(_logprob(lm.model, ids, prompt), abs=1e-4)
        assert abs(logprob - causal_logprob) > 1e-3


def test_each_context_is_prefilled_once(lm):
    args = [(CONTEXT, " true"), (CONTEXT, " false"), ("Is water wet?", " yes"), ("Is water wet?", " no")]
    calls = []
    handle = lm.model.register_forward_pre_hook(
        lambda module, a, kwargs: calls.append(kwargs), with_kwargs=True
    )
    try:
        lm.loglikelihood(_requests("loglikelihood", args), disable_tqdm=True)
    finally:
        handle.remove()
    # each context: one prefill under its segment, then its continuations in one batch (longer than one token)
    prefills = [c for c in calls if "segment_ids" in c]
    assert len(prefills) == 2
    assert all(c["input_ids"].shape[0] == 1 for c in prefills)


def test_chat_context_uses_turn_segments(lm):
    with _chatml(lm):
        rendered = lm.apply_chat_template(MESSAGES, add_generation_prompt=True)
        [(logprob, _)] = lm.loglikelihood(_requests("loglikelihood", [(rendered, "true")]), disable_tqdm=True)
        prompt = encode_chat(
            lm.tokenizer, MESSAGES, policy="mas", add_generation_prompt=True, causal_sink=lm.causal_sink
        )
        assert {0, 1, -1} <= set(prompt.segment_ids)  # system, user, the assistant header
        _, continuation_ids = lm._encode_pair(rendered, "true")
    ids = prompt.input_ids + continuation_ids
    segments = torch.tensor([prompt.segment_ids + [-1] * len(continuation_ids)])
    assert logprob == pytest.approx(
        _logprob(lm.model, ids, len(prompt.input_ids), segment_ids=segments), abs=1e-4
    )


def test_loglikelihood_rolling_is_causal(lm, plain):
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside."
    [logprob] = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    ids = [lm.prefix_token_id, *lm.tok_encode(text)]
    assert logprob == pytest.approx(_logprob(plain, ids, 1), abs=1e-4)
    # longer than the context: disjoint windows, each scored by the plain model
    lm._max_length = 16
    try:
        [windowed] = lm.loglikelihood_rolling(
            _requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True
        )
    finally:
        lm._max_length = 512
    windows = get_rolling_token_windows(lm.tok_encode(text), lm.prefix_token_id, 16, 1)
    expected = sum(_logprob(plain, c + p, len(c)) for c, p in map(make_disjoint_window, windows))
    assert windowed == pytest.approx(expected, abs=1e-4)


def test_generate_until_prefills_the_context(lm):
    settings = {"until": ["\n"], "max_gen_toks": 10, "do_sample": False}
    outputs = lm.generate_until(
        _requests("generate_until", [(CONTEXT, settings), ("Once upon", settings)]), True
    )
    for context, output in zip([CONTEXT, "Once upon"], outputs):
        [expected] = generate(
            lm.model, lm.tokenizer, context, "mas", causal_sink=False, max_new_tokens=10, do_sample=False
        )
        assert output == _cut(expected.text, ["\n"])
        assert "\n" not in output
    assert _cut("true.\nfalse", ["\n", "."]) == "true"


# ------------------------------------------------------------------------------------------ causal sink


@pytest.fixture(scope="module")
def sink_lm(stories_path) -> SegmaskLM:
    """The backend as lm_eval makes it from ``--model_args ...,causal_sink=true``."""
    args = f"pretrained={stories_path},mask=mas,causal_sink=true,device=cpu"
    return get_model("segmask").create_from_arg_string(args)


def test_causal_sink_model_argument(stories_path, sink_lm, lm):
    assert sink_lm.causal_sink is True and lm.causal_sink is False
    # absent: the run's value, else None, the policy's default: the BOS causal under mas, not under prefix
    for mask, token_0 in (("mas", -1), ("prefix", 0)):
        default = get_model("segmask").create_from_arg_string(
            f"pretrained={stories_path},mask={mask},device=cpu"
        )
        assert default.causal_sink is None
        assert default.prompt("Is water wet?", default.tok_encode("Is water wet?")).segment_ids[:2] == [
            token_0,
            0,
        ]
    off = get_model("segmask").create_from_arg_string(
        f"pretrained={stories_path},causal_sink=false,device=cpu"
    )
    assert off.causal_sink is False
    assert SegmaskLM(pretrained=str(stories_path), causal_sink="True", device="cpu").causal_sink is True
    with pytest.raises(ValueError, match="causal_sink must be true or false, got 'maybe'"):
        SegmaskLM(pretrained=str(stories_path), causal_sink="maybe", device="cpu")


def test_causal_sink_keeps_token_0_of_a_context_causal_and_after_a_cut(sink_lm, lm):
    """stories260K adds a BOS: it is the sink; a context cut from the left makes its new token 0 the sink."""
    context = "Is water wet?"
    ids = [1, 359, 419, 273, 413, 285, 263, 316, 450]
    assert [1, *lm.tok_encode(context)] == ids
    with_sink, plain = sink_lm.prompt(context, ids[1:]), lm.prompt(context, ids[1:])
    assert (with_sink.input_ids, with_sink.segment_ids) == (ids, [-1, 0, 0, 0, 0, 0, 0, 0, 0])
    assert (plain.input_ids, plain.segment_ids) == (ids, [0, 0, 0, 0, 0, 0, 0, 0, 0])
    sink_lm._max_length = lm._max_length = 8
    try:
        # a 3-token continuation leaves room for the last 5 context tokens
        assert sink_lm._fit(with_sink, 3) == ([413, 285, 263, 316, 450], [-1, 0, 0, 0, 0])
        assert lm._fit(plain, 3) == ([413, 285, 263, 316, 450], [0, 0, 0, 0, 0])
        assert sink_lm._fit(with_sink, 1) == (ids[2:], [-1, 0, 0, 0, 0, 0, 0])
        # the scored request runs under exactly those segments
        [(logprob, _)] = sink_lm.loglikelihood(_requests("loglikelihood", [(context, " yes")]), True)
        _, continuation = sink_lm._encode_pair(context, " yes")
        keep = 8 - len(continuation)
        segments = torch.tensor([[-1] + [0] * (keep - 1) + [-1] * len(continuation)])
        expected = _logprob(sink_lm.model, ids[-keep:] + continuation, keep, segment_ids=segments)
        assert logprob == pytest.approx(expected, abs=1e-4)
    finally:
        sink_lm._max_length = lm._max_length = 512
    [(uncut, _)] = sink_lm.loglikelihood(_requests("loglikelihood", [(context, " yes")]), True)
    [(off, _)] = lm.loglikelihood(_requests("loglikelihood", [(context, " yes")]), True)
    segments = torch.tensor([[-1] + [0] * 8 + [-1] * len(continuation)])
    assert uncut == pytest.approx(
        _logprob(sink_lm.model, ids + continuation, len(ids), segment_ids=segments), abs=1e-4
    )
    assert abs(uncut - off) > 1e-4  # the sink changes the score


def test_causal_sink_in_a_chat_context_and_after_a_cut(sink_lm):
    with _chatml(sink_lm):
        rendered = sink_lm.apply_chat_template(MESSAGES, add_generation_prompt=True)
        prompt = sink_lm.prompt(rendered, sink_lm.tok_encode(rendered))
        plain = encode_chat(
            sink_lm.tokenizer, MESSAGES, policy="mas", add_generation_prompt=True, causal_sink=False
        )
    # this template renders no BOS: the sink is its first token, then the rest of the system turn, the user
    # turn and the assistant header
    assert prompt.segment_ids == [-1] + [0] * 39 + [1] * 30 + [-1] * 17
    assert plain.input_ids == prompt.input_ids and plain.input_ids[0] != sink_lm.tokenizer.bos_token_id
    assert plain.segment_ids == [0] * 40 + [1] * 30 + [-1] * 17
    sink_lm._max_length = 23  # 3 continuation tokens: the last 3 user tokens and the header are kept
    try:
        ids, segments = sink_lm._fit(prompt, 3)
    finally:
        sink_lm._max_length = 512
    assert ids == prompt.input_ids[-20:] and segments == [-1, 1, 1] + [-1] * 17


def test_generate_until_with_the_causal_sink_equals_generate(sink_lm):
    settings = {"until": ["\n"], "max_gen_toks": 16, "do_sample": False}
    contexts = ["Lily and Tom went to the park", "The sun was"]
    outputs = sink_lm.generate_until(_requests("generate_until", [(c, settings) for c in contexts]), True)
    for context, output in zip(contexts, outputs):
        [expected] = generate(
            sink_lm.model,
            sink_lm.tokenizer,
            context,
            "mas",
            causal_sink=True,
            max_new_tokens=16,
            do_sample=False,
        )
        [without] = generate(
            sink_lm.model,
            sink_lm.tokenizer,
            context,
            "mas",
            causal_sink=False,
            max_new_tokens=16,
            do_sample=False,
        )
        assert output == _cut(expected.text, ["\n"])
        assert expected.token_ids != without.token_ids  # the sink matters here, so the check above can fail


def test_simple_evaluate_on_local_tasks(lm, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        limit=3,
        log_samples=True,
    )
    metrics = results["results"]
    assert 0.0 <= metrics["segmask_boolq_mc"]["acc,none"] <= 1.0
    assert 0.0 <= metrics["segmask_boolq_gen"]["exact_match,none"] <= 1.0
    assert metrics["segmask_boolq_rolling"]["word_perplexity,none"] > 1.0
    # the harness's numbers are this backend's answers to the same requests
    for sample in results["samples"]["segmask_boolq_mc"]:
        assert [continuation for _, continuation in sample["arguments"]] == [" true", " false"]
        direct = lm.loglikelihood(
            _requests("loglikelihood", [tuple(a) for a in sample["arguments"]]), disable_tqdm=True
        )
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx([d[0] for d in direct], abs=1e-5)


def test_command_line(stories_path, task_dir, tmp_path):
    """`python -m segmask.integrations.lm_eval` is `lm_eval` with --model segmask available."""
    command = [sys.executable, "-m", "segmask.integrations.lm_eval", "--model", "segmask"]
    command += ["--model_args", f"pretrained={stories_path},mask=mas", "--tasks", ",".join(TASKS)]
    command += ["--include_path", str(task_dir), "--limit", "2", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    [written] = list((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(written.read_text())
    assert set(results["results"]) == set(TASKS)
    assert results["config"]["model"] == "segmask"


def test_template_model_argument(stories_path, lm):
    """template=paper: a plain context is the instruction of a record in the official evaluation prompt,
    with its ' ###' blocks; absent (none), the raw context is one segment; a bad name is refused."""
    paper = get_model("segmask").create_from_arg_string(
        f"pretrained={stories_path},template=paper,device=cpu"
    )
    assert paper.template == "paper" and lm.template is None
    prompt = paper.prompt("Is the sky blue?", paper.tok_encode("Is the sky blue?"))
    # stories260K: the same prompt as segmask eval --template paper builds for this instruction (BOS causal:
    # the mas default)
    assert prompt.segment_ids == [-1] + [0] * 88 + [1] * 58 + [-1] * 24
    assert paper.tokenizer.decode(prompt.input_ids[-27:-24]) == "###"
    raw = lm.prompt("Is the sky blue?", lm.tok_encode("Is the sky blue?"))
    assert set(raw.segment_ids) == {0}
    with pytest.raises(ValueError, match=r"^unknown template 'official'; expected one of alpaca, paper$"):
        SegmaskLM(pretrained=str(stories_path), template="official", device="cpu")
