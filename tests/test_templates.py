"""segmask.templates: the official LLM-Adapters texts byte for byte, and the `` ###`` blocks."""

from __future__ import annotations

import pytest

from segmask.templates import (
    TEMPLATES,
    check_template,
    instruction_pieces,
    paper_eval_prompt,
    paper_train_prompt,
)
from segmask.turns import CONTENT, END, HEADER

SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
S16 = "                "  # 16 spaces, written out once


def test_templates_are_named():
    assert TEMPLATES == ("alpaca", "paper")
    assert check_template("paper") == "paper"
    with pytest.raises(ValueError, match=r"^unknown template 'official'; expected one of alpaca, paper$"):
        check_template("official")


def test_paper_training_text_is_utils_dora_generate_prompt():
    # utils_dora.py generate_prompt (no input): "request." + 2 spaces, a line of 16 spaces before "###"
    expected = (
        SYSTEM + "  \n"
        "\n"
        "                ### Instruction:\n"
        "                Q?\n"
        "                \n"
        "                ### Response:\n"
        "                the correct answer is true"
    )
    assert paper_train_prompt("Q?", "", "the correct answer is true") == expected
    assert expected.count(S16) == 5
    # with an input: one trailing space, 16-space lines before each "###"
    assert paper_train_prompt("Q?", "ctx", "A") == (
        SYSTEM_INPUT + " \n\n"
        f"{S16}### Instruction:\n{S16}Q?\n{S16}\n{S16}### Input:\n{S16}ctx\n{S16}\n{S16}### Response:\n{S16}A"
    )


def test_paper_evaluation_text_is_commonsense_evaluate_generate_prompt():
    # commonsense_evaluate.py generate_prompt: "request." + 1 space, empty lines, 16 spaces at the end
    expected = (
        SYSTEM
        + " \n\n                ### Instruction:\n                Q?\n\n                ### Response:\n                "
    )
    assert paper_eval_prompt("Q?") == expected
    assert paper_eval_prompt("Q?", "ctx") == (
        SYSTEM_INPUT
        + f"\n\n{S16}### Instruction:\n{S16}Q?\n\n{S16}### Input:\n{S16}ctx\n\n{S16}### Response:\n{S16}"
    )


def _blocks(pieces):
    text = {}
    for piece, turn, _ in pieces:
        text[turn] = text.get(turn, "") + piece
    return [text[turn] for turn in sorted(text)]


def test_paper_blocks_end_after_each_space_hashes():
    record = {"instruction": "Q?", "input": "", "output": "A"}
    pieces, roles = instruction_pieces(record, "paper", include_answer=False)
    assert roles == ["system", "user", "assistant"]
    assert _blocks(pieces) == [
        SYSTEM + " \n\n                ###",
        " Instruction:\n                Q?\n\n                ###",
        " Response:\n                ",
    ]
    pieces, _ = instruction_pieces(record, "paper", include_answer=True)
    assert _blocks(pieces) == [
        SYSTEM + "  \n\n                ###",
        " Instruction:\n                Q?\n                \n                ###",
        " Response:\n                A",
    ]
    assert pieces[-1] == ("A", 2, CONTENT)
    assert ("Q?", 1, CONTENT) in pieces and (" Instruction:\n" + S16, 1, HEADER) in pieces
    assert (f"\n{S16}\n{S16}###", 1, END) in pieces


def test_paper_input_is_its_own_block():
    pieces, roles = instruction_pieces({"instruction": "Q", "input": "I", "output": "A"}, "paper")
    assert roles == ["system", "user", "user", "assistant"]
    assert _blocks(pieces)[2] == f" Input:\n{S16}I\n{S16}\n{S16}###"


def test_space_hashes_inside_the_instruction_close_a_block_but_not_inside_the_answer():
    record = {"instruction": "a ### b", "input": "", "output": "x ### y"}
    pieces, roles = instruction_pieces(record, "paper")
    assert roles == ["system", "user", "user", "assistant"]
    blocks = _blocks(pieces)
    assert blocks[1] == f" Instruction:\n{S16}a ###"
    assert blocks[2] == f" b\n{S16}\n{S16}###"
    assert blocks[3] == f" Response:\n{S16}x ### y"


def test_alpaca_pieces_are_unchanged():
    pieces, roles = instruction_pieces({"instruction": "Q", "input": "", "output": "A"}, "alpaca")
    assert roles == ["system", "user", "assistant"]
    assert pieces == [
        (SYSTEM, 0, CONTENT),
        ("\n\n", 0, END),
        ("### Instruction:\n", 1, HEADER),
        ("Q", 1, CONTENT),
        ("\n\n", 1, END),
        ("### Response:\n", 2, HEADER),
        ("A", 2, CONTENT),
    ]
