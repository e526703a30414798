"""Building blocks of the from-scratch bAbI experiment (see run.py): a word-level tokenizer with a chat
template, a randomly initialised Llama, and chat-format scoring (segmask.scoring) that writes segmask
results files (segmask.results).

The tokenizer splits on whitespace and punctuation and knows every word of the bAbI files it was built
from; its chat template puts each turn between a role token and ``<|end|>``::

    <|user|> Mary moved to the bathroom . John went to the hallway . <|end|>      story     segment 0 (mas)
    <|user|> Where is Mary ? <|end|>                                                question  segment 1 (mas)
    <|assistant|> bathroom <|end|>                                                  answer    causal, labelled

Under ``prefix`` the story and the question are one segment; under ``causal`` everything is causal.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from segmask.results import Prediction, run_results, write_results
from segmask.scoring import chat_candidates, rank_candidates
from segmask.tasks.babi import Question, story_messages
from segmask.tasks.reading import Story, to_messages

# the pre-registered designs (results/babi_scratch, results/babi_mixed) are the paper's mask, story and
# question segments from token 0: a model trained from scratch has no pretrained attention sink to keep
CAUSAL_SINK = False

SPECIAL = ("[PAD]", "[UNK]", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def build_tokenizer(texts: Sequence[str]):
    """A word-level ``PreTrainedTokenizerFast`` over the words and punctuation of ``texts``, with the chat
    template above (``<|end|>`` is EOS, ``[PAD]`` padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({word for text in texts for word, _ in pre.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate([*SPECIAL, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class ModelSize:
    """A small Llama: ``hidden`` width, ``layers``, ``heads``; the MLP is 4x wide."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    max_positions: int = 1024

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")


def init_model(tokenizer, size: ModelSize, seed: int, out: Path) -> Path:
    """Save a randomly initialised ``LlamaForCausalLM`` (seeded) and ``tokenizer`` to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def parameter_count(folder: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


def permute_entities(questions: list[Question], places: Sequence[str], rng: random.Random) -> list[Question]:
    """One story with its people and places renamed by a random permutation of each (the same renaming in
    every statement, question and answer): a new story with the same structure and a consistent answer.
    People are the statements' first words, places the task's answer vocabulary."""
    people = sorted({sentence.split()[0] for q in questions for sentence in q.sentences})
    renaming = dict(zip(people, rng.sample(people, len(people)))) | dict(
        zip(places, rng.sample(list(places), len(places)))
    )
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renaming)) + r")\b")

    def rename(text: str) -> str:
        return pattern.sub(lambda match: renaming[match.group(1)], text)

    return [
        replace(
            q, sentences=tuple(map(rename, q.sentences)), question=rename(q.question), answer=rename(q.answer)
        )
        for q in questions
    ]


def augmented(
    stories: list[list[Question]], places: Sequence[str], copies: int, seed: int = 0
) -> list[list[Question]]:
    """The stories, then ``copies - 1`` renamed copies of each (:func:`permute_entities`), interleaved."""
    rng = random.Random(seed)
    out = []
    for story in stories:
        out.append(story)
        out += [permute_entities(story, places, rng) for _ in range(copies - 1)]
    return out


# ---- scoring chat records --------------------------------------------------------------------------


Prompt = tuple[list[dict[str, str]], Story]  # a question's prompt messages and the question itself


def question_prompts(stories: Sequence[Story]) -> list[Prompt]:
    """One chat per question: the story so far and the question (the ``question`` layout of training)."""
    return [(to_messages(story, include_answer=False), story) for story in stories]


def story_prompts(stories: Sequence[list[Question]], choices: tuple[str, ...], merge: bool) -> list[Prompt]:
    """Every question of each story, prompted by the whole story up to it as one chat, earlier questions with
    their gold answers (the ``story`` layout, see :func:`segmask.tasks.babi.story_messages`), in file order."""
    prompts = []
    for questions in stories:
        for number, q in enumerate(questions):
            messages = story_messages(questions[: number + 1], merge_turns=merge, include_last_answer=False)
            prompts.append((messages, Story(q.sentences, q.question, q.answer, choices)))
    return prompts


def score_stories(model, tokenizer, task: str, prompts: Sequence[Prompt], policy: str) -> list[Prediction]:
    """Predict each question's answer as the choice with the highest log-probability after a prefill of its
    prompt under ``policy``."""
    predictions = []
    for index, (messages, story) in enumerate(prompts):
        candidates = chat_candidates(tokenizer, messages, story.choices, policy, causal_sink=CAUSAL_SINK)
        best, by_choice = rank_candidates(model, *candidates)
        predictions.append(Prediction(task, index, "", best, best, story.answer, by_choice))
    return predictions


def evaluate_stories(
    model,
    tokenizer,
    tasks: dict[str, Sequence[Prompt]],
    policy: str,
    out: Path,
    model_name: str,
    layout: str = "question",
    condition: str | None = None,
) -> dict:
    """Score every task and write a results JSON (+ predictions JSONL) that ``segmask compare`` reads."""
    predictions = [
        p for name, stories in tasks.items() for p in score_stories(model, tokenizer, name, stories, policy)
    ]
    run = {"model": model_name, "policy": policy, "condition": condition or policy, "layout": layout}
    results = run_results(predictions, run | {"scoring": "loglik", "limit": None})
    write_results(results, predictions, out)
    return json.loads(out.read_text())
