"""segmask.scoring: loglik scores against plain transformers and one uncached forward, one prefill a prompt."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from segmask.scoring import continuation_logprobs, loglik_predictions
from segmask.segments import encode_instruction
from segmask.tasks.commonsense import ANSWER_PREFIX, answer_continuation, load_task

# ----------------------------------------------------------------------------------------------- loglik


@pytest.fixture(scope="module")
def boolq_task(commonsense_dir):
    return load_task(commonsense_dir, "boolq", limit=3)


def _plain_logprob(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start from one plain forward pass."""
    logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logprobs[start - 1 :].sum())


@torch.inference_mode()
def test_loglik_under_causal_equals_plain_transformers(stories, stories_path, boolq_task):
    model, tokenizer = stories
    plain = AutoModelForCausalLM.from_pretrained(stories_path)  # never enabled, no segment ids
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    for record, labels in zip(boolq_task.records, boolq_task.candidates):
        prompt = encode_instruction(tokenizer, record, policy="causal", include_answer=False)
        assert set(prompt.segment_ids) == {-1}
        continuations = [answer_continuation(tokenizer, record, label, "causal", prompt) for label in labels]
        scores = continuation_logprobs(model, prompt.input_ids, prompt.segment_ids, continuations)
        for continuation, score in zip(continuations, scores):
            expected = _plain_logprob(plain, prompt.input_ids + continuation, len(prompt.input_ids))
            assert score.logprob == pytest.approx(expected, abs=1e-4)


@torch.inference_mode()
def test_loglik_under_mas_equals_one_uncached_forward(stories, boolq_task):
    """Prefill once + cached candidates == one forward over prompt + answer with the full segment ids."""
    model, tokenizer = stories
    record, labels = boolq_task.records[0], boolq_task.candidates[0]
    prompt = encode_instruction(tokenizer, record, policy="mas", include_answer=False)
    assert {0, 1} <= set(prompt.segment_ids)  # system and instruction segments
    continuations = [answer_continuation(tokenizer, record, label, "mas", prompt) for label in labels]
    scores = continuation_logprobs(model, prompt.input_ids, prompt.segment_ids, continuations)
    causal = continuation_logprobs(model, prompt.input_ids, [-1] * len(prompt.input_ids), continuations)
    for continuation, score, causal_score in zip(continuations, scores, causal):
        ids = prompt.input_ids + continuation
        segments = prompt.segment_ids + [-1] * len(continuation)
        logits = model(torch.tensor([ids]), segment_ids=torch.tensor([segments])).logits[0].float()
        token_logprobs = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        start = len(prompt.input_ids) - 1
        assert score.logprob == pytest.approx(float(token_logprobs[start:].sum()), abs=1e-4)
        greedy = logits[start:-1].argmax(-1).tolist() == continuation
        assert score.is_greedy == greedy
        assert abs(score.logprob - causal_score.logprob) > 1e-3  # the mask changes the scores


def test_loglik_prefills_each_prompt_once(stories, boolq_task):
    model, tokenizer = stories
    calls = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True
    )
    try:
        predictions = loglik_predictions(model, tokenizer, boolq_task, "mas", progress=False)
    finally:
        handle.remove()
    # per record: one prefill of the prompt under its segments, one batch of both candidates against its cache
    assert len(calls) == 2 * len(boolq_task.records)
    assert all("segment_ids" in c for c in calls[0::2]) and not any("segment_ids" in c for c in calls[1::2])
    assert [c["input_ids"].shape[0] for c in calls[1::2]] == [2] * len(boolq_task.records)
    for prediction in predictions:
        assert set(prediction.scores) == {"true", "false"}
        assert prediction.prediction == max(prediction.scores, key=prediction.scores.get)
        assert prediction.output == ANSWER_PREFIX + prediction.prediction


# ------------------------------------------------------------------------------------------ candidates

# stories260K with STORIES_CHAT_TEMPLATE: "<|user|>\nHi</s>\n" then the header "<|assistant|>\n"
HI_PROMPT = [410, 504, 506, 425, 419, 285, 506, 505, 13, 440, 417, 2, 410, 13,
             504, 506, 412, 419, 419, 293, 413, 303, 413, 506, 505, 13]  # fmt: skip
HI_SEGMENTS = [-1] + [0] * 13 + [-1] * 12  # token 0 causal (mas's default sink), the user turn, the header


def chat_tokenizer(stories_path):
    from conftest import STORIES_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    tokenizer.chat_template = STORIES_CHAT_TEMPLATE
    return tokenizer


def test_chat_candidates_are_the_answer_tokens_after_the_header(stories_path):
    from segmask.scoring import chat_candidates

    tokenizer = chat_tokenizer(stories_path)
    prompt, candidates = chat_candidates(tokenizer, [{"role": "user", "content": "Hi"}], ["Yo", "No"], "mas")
    assert prompt.input_ids == HI_PROMPT and prompt.segment_ids == HI_SEGMENTS
    assert candidates["Yo"] == [452, 414, 2, 410, 13]  # "Yo</s>" and the turn's closing newline
    assert tokenizer.decode(candidates["No"]).startswith("No")
    paper, _ = chat_candidates(
        tokenizer, [{"role": "user", "content": "Hi"}], ["Yo"], "mas", causal_sink=False
    )
    assert paper.segment_ids == [0] + HI_SEGMENTS[1:]  # the paper's mask: token 0 in the user's segment


@torch.inference_mode()
def test_rank_candidates_sums_each_answer_under_the_prompt_mask(stories_path):
    """Each label's score is the summed log-probability of its tokens after the prompt, from one dense-mask
    forward of prompt + answer (an independent computation); the best label is the highest."""
    from segmask.hook import enable
    from segmask.masks import dense_mask
    from segmask.scoring import chat_candidates, rank_candidates

    tokenizer = chat_tokenizer(stories_path)
    model = enable(AutoModelForCausalLM.from_pretrained(stories_path, attn_implementation="eager"))
    plain = AutoModelForCausalLM.from_pretrained(stories_path, attn_implementation="eager")
    prompt, candidates = chat_candidates(
        tokenizer, [{"role": "user", "content": "Once upon a time"}], ["Lily", "Tom", "a big dog"], "mas"
    )
    best, scores = rank_candidates(model, prompt, candidates)
    expected = {}
    for label, answer in candidates.items():
        ids = prompt.input_ids + answer
        segments = torch.tensor([prompt.segment_ids + [-1] * len(answer)])
        additive = torch.zeros(1, 1, len(ids), len(ids)).masked_fill(~dense_mask(segments), float("-inf"))
        logits = plain(torch.tensor([ids]), attention_mask=additive).logits[0].float()
        logprobs = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        expected[label] = float(logprobs[len(prompt.input_ids) - 1 :].sum())
    assert scores == pytest.approx(expected, abs=1e-4)
    assert best == max(expected, key=expected.__getitem__)
