"""Prompt segmentation: chat messages or instruction records to tokens, segment ids and labels.

Example::

    from transformers import AutoTokenizer
    from segmask.segments import encode_chat

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}]
    encoded = encode_chat(tokenizer, chat, policy="mas")

``encoded.input_ids`` are exactly ``tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"]``.
Each system, user or tool turn, with its role header and end-of-turn tokens, is one segment; assistant
turns and the generation prompt are causal (-1); labels fall on assistant content and its end-of-turn::

    <|im_start|>system\\nBe brief.<|im_end|>\\n       segment  0   labels -100
    <|im_start|>user\\nHi there<|im_end|>\\n          segment  1   labels -100
    <|im_start|>assistant\\n                         segment -1   labels -100
    Hello!<|im_end|>\\n                              segment -1   labels = input_ids

Policies (see :mod:`segmask.masks`): ``mas`` as above; ``prefix``: every token before the final assistant
turn (or the generation prompt) is segment 0, so only that final turn is trained; ``causal``: all -1.

``causal_sink`` (every encoder) keeps token 0 causal under ``mas`` and ``prefix``: the tokenizer's BOS, or
the first prompt token when the tokenizer adds none. That token is a causally pretrained model's attention
sink; inside a bidirectional segment its keys and values would depend on the rest of the segment. The rule
is :func:`sink_segments`::

    mas, causal_sink=False      0  0  0  1  1 -1 -1     (the paper's mask)
    mas (default)              -1  0  0  1  1 -1 -1

``causal_sink=None`` (the default everywhere) is the policy's default, :func:`sink_on`: on under ``mas``,
off under ``prefix``. ``mas`` keeps the sink causal by default because the demo study
(``results/demo_study/``, issue 20) found it no worse than the paper's mask after training, and far better
before it; ``causal_sink=False`` is the paper's variant. ``prefix`` was not measured and keeps the sink in
its segment unless asked.

How turns are found in any chat template (and tokens mapped to turns): :mod:`segmask.turns`.

Instruction records (LLM-Adapters: ``instruction``, ``input``, ``output``, ``answer``) use an instruction
template of :mod:`segmask.templates` (``template="alpaca"``, the default, or ``"paper"``: the official
LLM-Adapters text and `` ###`` blocks of the paper's runs), or a model's chat template with
``chat_template=True``. The default ``alpaca``::

    Below is an instruction that describes a task. Write a response ...\\n\\n   segment 0 (system)
    ### Instruction:\\n{instruction}\\n\\n                                    segment 1 (user)
    ### Response:\\n                                                         causal
    {output}</s>                                                             causal, labelled

Length limits (``cutoff``, ``overflow``) are :mod:`segmask.overflow`: ``error``, ``skip``, or ``truncate``
(cut the longest prompt turn's content from its start); an answer is never cut.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from segmask import guard, templates, turns
from segmask.overflow import Overflow, apply_cutoff
from segmask.policies import MaskPolicy, check_policy, sink_on
from segmask.templates import DEFAULT_TEMPLATE, PAPER_SYSTEM, PAPER_SYSTEM_WITH_INPUT
from segmask.turns import CONTENT, END, HEADER

IGNORE_INDEX = -100
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
PROMPT_ROLES: tuple[str, ...] = ("system", "user", "tool")
TrainOn = Literal["all", "last"]


@dataclass(frozen=True)
class Encoded:
    """One tokenized example; every list has one entry per token (length ``L``).

    - ``input_ids``: token ids.
    - ``segment_ids``: ``>= 0`` a bidirectional prompt segment, ``-1`` a causal token.
    - ``labels``: the token id where the loss falls (HF convention, the model shifts), ``-100`` elsewhere.
      A labelled token is always causal; construction checks it.
    - ``prompt_turns``: for a content token of a system/user/tool turn the index of its turn, else -1
      (template tokens, answers). Where :func:`segmask.overflow.truncate_prompt` may cut; empty when unknown.
    """

    input_ids: list[int]
    segment_ids: list[int]
    labels: list[int]
    prompt_turns: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        for name in ("segment_ids", "labels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but input_ids has {n}")
        if self.prompt_turns and len(self.prompt_turns) != n:
            raise ValueError(f"prompt_turns has {len(self.prompt_turns)} entries but input_ids has {n}")
        for position, (segment, label) in enumerate(zip(self.segment_ids, self.labels)):
            if segment < -1:
                raise ValueError(f"token {position}: segment id {segment} < -1")
            if label != IGNORE_INDEX and segment != -1:
                raise ValueError(
                    f"token {position} is labelled but lies in bidirectional segment {segment}: "
                    "a labelled token must be causal (segment id -1)"
                )
        if any(segment >= 0 for segment in self.segment_ids):
            guard.install()  # from now on a model that was not enabled refuses these ids, never ignores them

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------------- chat


def check_messages(messages: Any) -> list[dict]:
    """Return ``messages`` as a list of dicts, or raise a ``ValueError`` naming the message and problem."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ValueError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError("messages: empty conversation")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"message {index}: expected a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {index}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if "content" not in message or message["content"] is None:
            raise ValueError(f"message {index} ({role}): missing content")
        if not isinstance(message["content"], str):
            raise ValueError(
                f"message {index} ({role}): content must be a string, got {type(message['content']).__name__}"
            )
        checked.append(dict(message))
    return checked


def _encode(
    ids: list[int],
    token_turns: list[int],
    token_kinds: list[int],
    roles: list[str],
    policy: MaskPolicy,
    labelled: set[int],
) -> Encoded:
    """Segment ids and labels from each token's turn and kind; ``roles[t]`` is the role of turn ``t``."""
    assistants = [t for t, role in enumerate(roles) if role == "assistant"]
    if policy == "causal":
        segment_of = dict.fromkeys(range(len(roles)), -1)
    elif policy == "prefix":
        final = assistants[-1] if assistants else len(roles)
        segment_of = {t: 0 if t < final else -1 for t in range(len(roles))}
    else:
        present = sorted({t for t in token_turns if roles[t] in PROMPT_ROLES})
        segment_of = {t: -1 for t in range(len(roles))} | {t: s for s, t in enumerate(present)}
    segment_ids = [segment_of[t] for t in token_turns]
    labels = [
        token if turn in labelled and kind != HEADER and segment_of[turn] == -1 else IGNORE_INDEX
        for token, turn, kind in zip(ids, token_turns, token_kinds)
    ]
    prompt_turns = [
        turn if roles[turn] in PROMPT_ROLES and kind == CONTENT else -1
        for turn, kind in zip(token_turns, token_kinds)
    ]
    return Encoded(list(ids), segment_ids, labels, prompt_turns)  # checks that labelled tokens are causal


def sink_segments(segment_ids: Sequence[int]) -> list[int]:
    """``segment_ids`` with token 0 (the attention sink: BOS, else the first prompt token) made causal (-1).

    ``[0, 0, 0, 1, 1, -1, -1]`` -> ``[-1, 0, 0, 1, 1, -1, -1]``. The one place the sink rule is written.
    """
    return [-1, *segment_ids[1:]]


def _with_sink(encoded: Encoded, policy: MaskPolicy, causal_sink: bool | None) -> Encoded:
    """``encoded`` with :func:`sink_segments` applied when :func:`sink_on` says so; the sink is then no
    prompt content, so :func:`segmask.overflow.truncate_prompt` never cuts it."""
    if not sink_on(policy, causal_sink) or not encoded.input_ids:
        return encoded
    turns_ = [-1, *encoded.prompt_turns[1:]] if encoded.prompt_turns else []
    return Encoded(encoded.input_ids, sink_segments(encoded.segment_ids), encoded.labels, turns_)


def _labelled_turns(roles: list[str], train_on: TrainOn) -> set[int]:
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    assistants = [t for t, role in enumerate(roles) if role == "assistant"]
    return set(assistants[-1:] if train_on == "last" else assistants)


def encode_chat(
    tokenizer,
    messages: Sequence[Mapping[str, Any]],
    policy: MaskPolicy = "mas",
    add_generation_prompt: bool = False,
    train_on: TrainOn = "all",
    cutoff: int | None = None,
    overflow: Overflow = "error",
    chat_template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    causal_sink: bool | None = None,
) -> Encoded | None:
    """Tokens, segment ids and labels of a conversation under the tokenizer's chat template.

    ``input_ids`` equal ``tokenizer.apply_chat_template(messages, tokenize=True,
    add_generation_prompt=add_generation_prompt)["input_ids"]``. Labels cover every assistant turn's
    content and end-of-turn (``train_on="last"``: only the last), but only turns that are causal under the
    policy (under ``prefix`` the final one). ``chat_template`` overrides the tokenizer's template;
    ``template_kwargs`` go to the template. With ``cutoff`` see :func:`segmask.overflow.apply_cutoff`
    (``None`` only for a skipped conversation). ``causal_sink``: token 0 causal (:func:`sink_on`; ``None``: on under ``mas``).
    A template that renders the messages out of order, or a token that would label prompt text (no separator
    between a prompt turn and its answer), is a ``ValueError`` (:mod:`segmask.turns`).
    """
    policy = check_policy(policy)
    messages = check_messages(messages)
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; pass chat_template=<jinja string>, or use encode_instruction "
            "(its default template needs none)"
        )
    roles = [message["role"] for message in messages]
    if not add_generation_prompt and "assistant" not in roles:
        raise ValueError(
            f"messages 0..{len(messages) - 1}: no assistant turn to train on; pass add_generation_prompt=True "
            "to encode a prompt for generation"
        )
    text, char_turns, kinds = turns.chat_layout(
        tokenizer, messages, add_generation_prompt, chat_template, template_kwargs
    )
    labelled = _labelled_turns(roles, train_on)
    prompt = {t for t, role in enumerate(roles) if role in PROMPT_ROLES}
    ids, token_turns, token_kinds = turns.token_layout(
        tokenizer, text, char_turns, kinds, add_special_tokens=False, prompt=prompt, labelled=labelled
    )
    if add_generation_prompt:
        roles.append("assistant")  # the generation prompt (turn len(messages)) opens an answer
    encoded = _with_sink(_encode(ids, token_turns, token_kinds, roles, policy, labelled), policy, causal_sink)
    return apply_cutoff(encoded, cutoff, overflow)


# --------------------------------------------------------------------------------------- instructions


def check_record(record: Any, include_answer: bool) -> dict[str, str]:
    """The record's ``instruction``, ``input`` and ``output`` strings, or a ``ValueError`` naming the field."""
    if not isinstance(record, Mapping):
        raise ValueError(f"an instruction record must be a dict, got {type(record).__name__}")
    fields = {"instruction": record.get("instruction"), "input": record.get("input") or "", "output": None}
    if include_answer:
        fields["output"] = record.get("output")
    for name, value in fields.items():
        if name == "output" and not include_answer:
            continue
        if value is None:
            raise ValueError(f"instruction record: missing {name!r}")
        if not isinstance(value, str):
            raise ValueError(f"instruction record: {name!r} must be a string, got {type(value).__name__}")
    return fields  # type: ignore[return-value]


def instruction_messages(record: Mapping[str, Any], include_answer: bool = True) -> list[dict[str, str]]:
    """The record as chat messages: the paper's system sentence, the instruction (and input), the output."""
    fields = check_record(record, include_answer)
    system = PAPER_SYSTEM_WITH_INPUT if fields["input"] else PAPER_SYSTEM
    user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if include_answer:
        messages.append({"role": "assistant", "content": fields["output"]})
    return messages


def instruction_pieces(
    record: Mapping[str, Any], include_answer: bool = True, template: str = DEFAULT_TEMPLATE
) -> list[tuple[str, int, int]]:
    """The record in an instruction template as ``(text, turn, kind)`` pieces (:mod:`segmask.templates`);
    ``alpaca``: turn 0 system, 1 user, 2 response."""
    return templates.instruction_pieces(check_record(record, include_answer), template, include_answer)[0]


def encode_instruction(
    tokenizer,
    record: Mapping[str, Any],
    policy: MaskPolicy = "mas",
    include_answer: bool = True,
    chat_template: bool | str = False,
    cutoff: int | None = None,
    overflow: Overflow = "error",
    causal_sink: bool | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> Encoded | None:
    """Tokens, segment ids and labels of an LLM-Adapters record (``instruction``, ``input``, ``output``).

    The text of ``template`` (:mod:`segmask.templates`), tokenized as one text as LLM-Adapters does (with
    the tokenizer's BOS, and EOS after the answer); works for base models without a chat template.
    ``alpaca`` (default) under ``mas``: the system sentence is segment 0, instruction and input segment 1,
    ``### Response:`` and the answer causal. ``paper``: the official training text (with the answer) or
    evaluation prompt (``include_answer=False``), one segment per block closed by `` ###``: system 0,
    instruction 1 (input 2), `` Response:`` and the answer causal. ``include_answer=False`` ends after the
    response header (a prompt for generation). ``chat_template=True`` (or a Jinja string) renders the record
    as system, user and assistant turns with a chat template instead (``template`` must then be
    ``alpaca``). Labels fall on the answer (and EOS) only. With ``cutoff`` see
    :func:`segmask.overflow.apply_cutoff`.
    ``causal_sink``: the BOS (else the first token) causal (:func:`sink_on`; ``None``: on under ``mas``).
    """
    policy = check_policy(policy)
    template = templates.check_template(template)
    if chat_template is not False:
        if template != DEFAULT_TEMPLATE:
            raise ValueError(
                f"template {template!r} is an instruction text; it cannot be combined with a chat template"
            )
        return encode_chat(
            tokenizer,
            instruction_messages(record, include_answer),
            policy=policy,
            add_generation_prompt=not include_answer,
            cutoff=cutoff,
            overflow=overflow,
            chat_template=chat_template if isinstance(chat_template, str) else None,
            causal_sink=causal_sink,
        )
    pieces, roles = templates.instruction_pieces(
        check_record(record, include_answer), template, include_answer
    )
    text = "".join(piece for piece, _, _ in pieces)
    char_turns = [turn for piece, turn, _ in pieces for _ in piece]
    kinds = [kind for piece, _, kind in pieces for _ in piece]
    ids, token_turns, token_kinds = turns.token_layout(
        tokenizer, text, char_turns, kinds, add_special_tokens=True
    )
    eos, answer = tokenizer.eos_token_id, len(roles) - 1
    if include_answer and eos is not None and ids[-1] != eos:
        ids, token_turns, token_kinds = ids + [eos], token_turns + [answer], token_kinds + [END]
    labelled = {answer} if include_answer else set()
    encoded = _encode(ids, token_turns, token_kinds, roles, policy, labelled)
    return apply_cutoff(_with_sink(encoded, policy, causal_sink), cutoff, overflow)


# ------------------------------------------------------------------------------------------- raw text


def encode_tokens(
    input_ids: Sequence[int], policy: MaskPolicy = "mas", causal_sink: bool | None = None
) -> Encoded:
    """Raw token ids as a prompt, without labels: one bidirectional segment (0), all causal under ``causal``.

    This is the only place raw text meets a policy: a text has no turns, so ``mas`` and ``prefix`` both
    make the whole of it one prompt segment (with the sink on, all but token 0: :func:`sink_on`).
    """
    policy = check_policy(policy)
    ids = list(input_ids)
    segment = -1 if policy == "causal" else 0
    encoded = Encoded(input_ids=ids, segment_ids=[segment] * len(ids), labels=[IGNORE_INDEX] * len(ids))
    return _with_sink(encoded, policy, causal_sink)


def encode_text(tokenizer, text: str, policy: MaskPolicy = "mas", causal_sink: bool | None = None) -> Encoded:
    """A raw text (no template) as a prompt: tokenized as is, then :func:`encode_tokens`."""
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise ValueError("empty prompt: the text tokenizes to no tokens")
    return encode_tokens(ids, policy, causal_sink)
