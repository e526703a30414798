"""`segmask.overflow`: one vocabulary (error / truncate / skip) for encoding, training and evaluation, and
literal cuts of hand-made records (cases with a tokenizer: tests/test_segments.py, test_evaluation.py)."""

from __future__ import annotations

import pytest

from segmask.eval_config import EvalConfig
from segmask.overflow import OVERFLOWS, apply_cutoff, apply_cutoff_all, fit_prompt, truncate_prompt
from segmask.segments import IGNORE_INDEX, Encoded
from segmask.train_config import TrainConfig

N = IGNORE_INDEX
# system turn 0 (3 content tokens), user turn 1 (2), a causal answer: 9 tokens, 5 of them prompt content
RECORD = Encoded(
    input_ids=[1, 10, 11, 12, 2, 20, 21, 3, 30],
    segment_ids=[-1, 0, 0, 0, 1, 1, 1, -1, -1],
    labels=[N, N, N, N, N, N, N, N, 30],
    prompt_turns=[-1, 0, 0, 0, -1, 1, 1, -1, -1],
)


def test_truncate_cuts_the_longest_turn_from_its_start_literally():
    assert truncate_prompt(RECORD, 9) is RECORD
    assert truncate_prompt(RECORD, 8).input_ids == [1, 11, 12, 2, 20, 21, 3, 30]  # turn 0 had 3, turn 1 had 2
    assert truncate_prompt(RECORD, 6).input_ids == [1, 12, 2, 21, 3, 30]  # then both, one token each
    cut = truncate_prompt(RECORD, 5)
    assert (cut.input_ids, cut.segment_ids, cut.labels) == (
        [1, 2, 21, 3, 30],
        [-1, 1, 1, -1, -1],
        [N] * 4 + [30],
    )
    with pytest.raises(ValueError, match="only 5 are prompt content"):
        truncate_prompt(RECORD, 3)


def test_each_choice_literally_for_one_record_and_a_batch():
    assert apply_cutoff(RECORD, None) is RECORD and apply_cutoff(RECORD, 9, "error") is RECORD
    with pytest.raises(ValueError, match="9 tokens exceed cutoff 8; pass overflow='skip' or 'truncate'"):
        apply_cutoff(RECORD, 8, "error")
    assert apply_cutoff(RECORD, 8, "skip") is None
    assert apply_cutoff(RECORD, 8, "truncate") == truncate_prompt(RECORD, 8)
    short = Encoded([1, 3, 30], [-1, -1, -1], [N, N, 30])
    kept, report = apply_cutoff_all([short, RECORD], 8, "skip")
    assert kept == [short] and str(report) == (
        "1 of 2 records exceed cutoff 8: error fails on 1, skip leaves out 1, truncate truncates 1"
    )
    with pytest.raises(
        ValueError, match="unknown overflow policy 'drop'; expected one of error, truncate, skip"
    ):
        apply_cutoff(RECORD, 8, "drop")  # type: ignore[arg-type]


def test_fit_prompt_is_the_same_choice_against_the_models_context():
    assert fit_prompt(RECORD, room=1, context=10, overflow="error", name="r") is RECORD
    assert fit_prompt(RECORD, room=2, context=10, overflow="skip", name="r") is None
    assert fit_prompt(RECORD, room=2, context=10, overflow="truncate", name="r") == truncate_prompt(RECORD, 8)
    with pytest.raises(ValueError, match="r: its prompt of 9 tokens and 2 answer tokens exceed"):
        fit_prompt(RECORD, room=2, context=10, overflow="error", name="r")


def test_training_and_evaluation_take_the_same_words_and_no_others(tmp_path):
    assert OVERFLOWS == ("error", "truncate", "skip")
    for overflow in OVERFLOWS:
        assert TrainConfig(model="m", data="d.json", overflow=overflow).overflow == overflow
        assert EvalConfig(str(tmp_path), "boolq", overflow=overflow).overflow == overflow
    assert TrainConfig(model="m", data="d.json").overflow == "skip"  # training leaves a long record out
    for old in ("raise", "drop", "truncate_prompt"):  # the words before issue 32: no aliases
        with pytest.raises(ValueError, match="overflow must be one of error, truncate, skip"):
            TrainConfig(model="m", data="d.json", overflow=old)
        with pytest.raises(ValueError, match="unknown overflow"):
            EvalConfig(str(tmp_path), "boolq", overflow=old)
