"""Instruction templates: an LLM-Adapters record (``instruction``, ``input``, ``output``) as text pieces.

    >>> from segmask.templates import paper_eval_prompt
    >>> paper_eval_prompt("Say hi.")[-44:]
    '### Instruction:\\n                Say hi.\\n\\n                ### Response:\\n                '

Two templates, both ``(text, turn, kind)`` pieces for :func:`segmask.segments.encode_instruction`:

``alpaca`` (the default: segmask's results so far use it)
    The plain Alpaca text, the same for training and evaluation; the system sentence is turn 0, the
    instruction (and input) turn 1, ``### Response:`` and the answer the causal turn. It reproduces the
    official ``alpaca`` partition (``mas_llama_impl/modeling_mas_llama.py``,
    ``calculate_attention_mask_for_alpaca``)::

        Below is an instruction ... request.\\n\\n        turn 0 (system)
        ### Instruction:\\n{instruction}\\n\\n             turn 1 (user)
        ### Response:\\n{output}                          causal

``paper`` (what the paper's commonsense runs used)
    The official LLM-Adapters/DoRA text, byte for byte, with its 16-space indentation. Training text is
    ``generate_prompt`` of ``utils_dora.py`` (shacharKZ/MAS-Segment-Based-Attention-Masking; the same as
    NVlabs/DoRA ``commonsense_reasoning/finetune.py``): two spaces after "request." and a line of 16
    spaces before each ``###``. Evaluation text (a prompt without its answer) is ``generate_prompt`` of
    ``commonsense/commonsense_evaluate.py`` (the same as AGI-Edgerunners/LLM-Adapters
    ``commonsense_evaluate.py``): one space after "request." and empty lines. The with-input variants are
    reproduced too (there, training has one trailing space and evaluation none). Blocks follow the
    official ``commonsense`` partition (``calculate_attention_mask_for_commonsenseDS_template``, the
    config's default ``MAS_template``): a block ends just after each `` ###`` (Llama-3 token 17010), so
    that token closes the block before it::

        <|begin_of_text|>Below is ... request. \\n\\n                ###     turn 0 (system)
         Instruction:\\n                {instruction}\\n\\n                ###  turn 1 (user)
         Input:\\n                {input}\\n\\n                ###             turn 2 (user, with an input)
         Response:\\n                {output}                                causal

    On every tokenizer the rule is written in characters: **the characters `` ###`` close a block, and a
    token belongs to the block of its last character** (:func:`segmask.turns.token_layout`). Where
    `` ###`` is one token (Llama-3, Qwen2.5) this is the official rule token for token. Where it is split
    (a SentencePiece vocabulary, say), every token that ends inside or at the end of `` ###`` closes the
    block and a token that reaches past it (``"#\\n"``) opens the next one. A `` ###`` inside the
    instruction or input closes a block there too, as officially; one inside the answer does not (the
    official mask would make answer tokens bidirectional; segmask keeps every supervised token causal).

Only this module knows the template texts; :mod:`segmask.segments` maps turns to segment ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

from segmask.turns import CONTENT, END, HEADER

InstructionTemplate = Literal["alpaca", "paper"]
TEMPLATES: tuple[str, ...] = get_args(InstructionTemplate)
DEFAULT_TEMPLATE: InstructionTemplate = "alpaca"
#: one line per template, for flags and config fields
TEMPLATE_HELP = (
    "instruction template: alpaca (plain Alpaca text) or paper (the official LLM-Adapters text and "
    "' ###' blocks of the paper's runs)"
)

PAPER_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
PAPER_SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
#: the official commonsense partition's separator (``COMMONSENSE_SEPERATOR = 17010`` on Llama-3)
PAPER_SEPARATOR = " ###"
_INDENT = " " * 16

Piece = tuple[str, int, int]  # (text, turn, kind)


def check_template(name: object) -> InstructionTemplate:
    """``name`` if it is a template, else a one-line ``ValueError`` listing the templates."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; expected one of {', '.join(TEMPLATES)}")
    return name  # type: ignore[return-value]


# ---------------------------------------------------------------------------------- the official texts


def paper_train_prompt(instruction: str, input: str, output: str) -> str:
    """The official training text: ``generate_prompt(data_point)`` of ``utils_dora.py`` (MAS repo), itself
    NVlabs/DoRA ``commonsense_reasoning/finetune.py`` ``generate_prompt``, byte for byte."""
    if input:
        return (
            f"{PAPER_SYSTEM_WITH_INPUT} \n\n{_INDENT}### Instruction:\n{_INDENT}{instruction}\n{_INDENT}\n"
            f"{_INDENT}### Input:\n{_INDENT}{input}\n{_INDENT}\n{_INDENT}### Response:\n{_INDENT}{output}"
        )
    return (
        f"{PAPER_SYSTEM}  \n\n{_INDENT}### Instruction:\n{_INDENT}{instruction}\n{_INDENT}\n"
        f"{_INDENT}### Response:\n{_INDENT}{output}"
    )


def paper_eval_prompt(instruction: str, input: str = "") -> str:
    """The official evaluation prompt: ``generate_prompt(instruction, input)`` of
    ``commonsense/commonsense_evaluate.py`` (MAS repo; AGI-Edgerunners/LLM-Adapters and NVlabs/DoRA
    ``commonsense_evaluate.py`` have the same), byte for byte."""
    if input:
        return (
            f"{PAPER_SYSTEM_WITH_INPUT}\n\n{_INDENT}### Instruction:\n{_INDENT}{instruction}\n\n"
            f"{_INDENT}### Input:\n{_INDENT}{input}\n\n{_INDENT}### Response:\n{_INDENT}"
        )
    return (
        f"{PAPER_SYSTEM} \n\n{_INDENT}### Instruction:\n{_INDENT}{instruction}\n\n"
        f"{_INDENT}### Response:\n{_INDENT}"
    )


# ------------------------------------------------------------------------------------------ pieces


def instruction_pieces(
    fields: Mapping[str, str], template: str = DEFAULT_TEMPLATE, include_answer: bool = True
) -> tuple[list[Piece], list[str]]:
    """The record's text as ``(text, turn, kind)`` pieces, and each turn's role.

    ``fields``: ``instruction``, ``input`` (may be empty) and, with ``include_answer``, ``output``. Roles
    are ``system`` (turn 0), ``user`` (the prompt's other turns) and ``assistant`` (the last turn: the
    response header and the answer). ``paper`` gives its training text with ``include_answer`` and its
    evaluation prompt without.
    """
    template = check_template(template)
    if template == "alpaca":
        return _alpaca(fields, include_answer), ["system", "user", "assistant"]
    return _paper(fields, include_answer)


def _alpaca(fields: Mapping[str, str], include_answer: bool) -> list[Piece]:
    system = PAPER_SYSTEM_WITH_INPUT if fields["input"] else PAPER_SYSTEM
    pieces = [(system, 0, CONTENT), ("\n\n", 0, END), ("### Instruction:\n", 1, HEADER)]
    pieces += [(fields["instruction"], 1, CONTENT), ("\n\n", 1, END)]
    if fields["input"]:
        pieces += [("### Input:\n", 1, HEADER), (fields["input"], 1, CONTENT), ("\n\n", 1, END)]
    pieces.append(("### Response:\n", 2, HEADER))
    if include_answer:
        pieces.append((fields["output"], 2, CONTENT))
    return pieces


def _paper(fields: Mapping[str, str], include_answer: bool) -> tuple[list[Piece], list[str]]:
    """The official text cut into (text, kind) parts, then into blocks at every `` ###`` of the prompt."""
    instruction, input_ = fields["instruction"], fields["input"]
    # the official texts, part by part: each part's kind; their concatenation is asserted below
    if include_answer:
        system = PAPER_SYSTEM_WITH_INPUT + " " if input_ else PAPER_SYSTEM + "  "
        gap = f"\n{_INDENT}\n{_INDENT}"  # the official training text's line of 16 spaces
        expected = paper_train_prompt(instruction, input_, fields["output"])
    else:
        system = PAPER_SYSTEM_WITH_INPUT if input_ else PAPER_SYSTEM + " "
        gap = f"\n\n{_INDENT}"
        expected = paper_eval_prompt(instruction, input_)
    parts = [(system.rstrip(" "), CONTENT), (system[len(system.rstrip(" ")) :] + f"\n\n{_INDENT}###", END)]
    parts += [(f" Instruction:\n{_INDENT}", HEADER), (instruction, CONTENT), (gap + "###", END)]
    if input_:
        parts += [(f" Input:\n{_INDENT}", HEADER), (input_, CONTENT), (gap + "###", END)]
    parts.append((f" Response:\n{_INDENT}", HEADER))
    answer = fields["output"] if include_answer else ""
    parts.append((answer, CONTENT))
    text = "".join(part for part, _ in parts)
    assert text == expected, "the paper template's parts drifted from the official text"
    # block boundaries: just after every " ###" that lies in the prompt (before the answer)
    prompt_end = len(text) - len(answer)
    ends, start = [], text.find(PAPER_SEPARATOR)
    while 0 <= start and start + len(PAPER_SEPARATOR) <= prompt_end:
        ends.append(start + len(PAPER_SEPARATOR))
        start = text.find(PAPER_SEPARATOR, start + 1)
    pieces: list[Piece] = []
    position, turn = 0, 0
    for part, kind in parts:
        while part:
            cut = ends[turn] - position if turn < len(ends) else len(part)
            if cut <= 0:  # a boundary at this position: the next turn starts
                turn += 1
                continue
            pieces.append((part[:cut], turn, kind))
            part, position = part[cut:], position + min(cut, len(part))
    roles = ["system"] + ["user"] * (len(ends) - 1) + ["assistant"]
    return pieces, roles
