"""The batching engine without HTTP: each engine numbers its own jobs, batch keys group jobs that sample
alike (a seeded sampling job alone), a full queue refuses a job with QueueFull, and the text a RowTracker
streams joins to the decode of the row's tokens, multi-byte characters of a byte-fallback tokenizer
included (issue 31)."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segmask.detokenize import byte_token_ids
from segmask.segments import Encoded
from segmask.serving.engine import Engine, Job, QueueFull, RowTracker, Sampling, Scheduler

GREEDY = Sampling(max_tokens=4, temperature=0.0, top_p=1.0, seed=None, stop=())
SEEDED = Sampling(max_tokens=4, temperature=0.7, top_p=0.9, seed=1, stop=())
PROMPT = Encoded([1, 2, 3], [0, 0, 0], [-100] * 3)


@pytest.fixture(scope="module")
def engine(stories_model, stories_tokenizer):
    return Engine(stories_model, stories_tokenizer, prefix_cache=None)


def new_jobs(engine: Engine, samplings: list[Sampling]) -> list:
    async def make() -> list:
        return [engine.new_job(PROMPT, "mas", s) for s in samplings]

    return asyncio.run(make())


def test_each_engine_numbers_its_own_jobs(engine, stories_tokenizer):
    other = Engine(engine.model, stories_tokenizer, prefix_cache=None)
    assert [job.id for job in new_jobs(engine, [GREEDY] * 3)] == [0, 1, 2]
    assert [job.id for job in new_jobs(other, [GREEDY] * 2)] == [0, 1]
    assert [job.id for job in new_jobs(engine, [GREEDY])] == [3]


def test_batches_group_jobs_that_sample_alike_and_a_full_queue_refuses(engine):
    scheduler = Scheduler(engine, max_batch=2, max_queue=4)  # not started: nothing takes jobs but us
    greedy_a, seeded_a, seeded_b, greedy_b = new_jobs(engine, [GREEDY, SEEDED, SEEDED, GREEDY])
    for job in (greedy_a, seeded_a, seeded_b, greedy_b):
        scheduler.submit(job)
    with pytest.raises(QueueFull) as full:
        scheduler.submit(new_jobs(engine, [GREEDY])[0])
    assert full.value.waiting == 4
    assert scheduler._take() == [greedy_a, greedy_b]
    assert scheduler._take() == [seeded_a]  # same seed, still alone: each seeded job has its own stream
    assert scheduler._take() == [seeded_b]


@pytest.mark.parametrize("temperature", [1e-38, 5e-324, 1e-6])
def test_an_underflowing_temperature_decodes_greedily(engine, temperature):
    """logits / 1e-38 overflow to inf and sampling fails on nan probabilities: such a job is greedy."""
    tiny = Sampling(max_tokens=6, temperature=temperature, top_p=1.0, seed=3, stop=())
    assert tiny.greedy and tiny.generate_kwargs() == {"do_sample": False}
    assert tiny.batch_key(0) == GREEDY.batch_key(1)  # it batches with the greedy jobs
    assert not Sampling(max_tokens=6, temperature=1e-4, top_p=1.0, seed=3, stop=()).greedy
    texts = [asyncio.run(run_alone(engine, s)) for s in (tiny, Sampling(6, 0.0, 1.0, None, ()))]
    assert texts[0] == texts[1] and texts[0][-1][0] == "done"


async def run_alone(engine: Engine, sampling: Sampling) -> list[tuple[str, str]]:
    """The events of one job run on the engine (on a thread, as the scheduler runs it)."""
    job = engine.new_job(PROMPT, "mas", sampling)
    await asyncio.to_thread(engine.run, [job])
    events = [await job.events.get()]
    while events[-1][0] == "text":
        events.append(await job.events.get())
    return events


# ------------------------------------------------------------------------------------------ streamed text


@dataclass(eq=False)
class RecordedJob(Job):
    """A job whose events are kept in a list instead of sent to a handler's queue."""

    sent: list = field(default_factory=list)

    def emit(self, kind: str, value: str) -> None:
        self.sent.append((kind, value))


@functools.cache
def byte_ids_of(tokenizer) -> frozenset[int]:
    """``byte_token_ids(tokenizer)``, read once per tokenizer (Llama-3's vocabulary has 128,256 tokens)."""
    return byte_token_ids(tokenizer)


@functools.cache
def vocab_size(tokenizer) -> int:
    return len(tokenizer)


def tracked(tokenizer, tokens: list[int], max_tokens: int | None = None, stop: tuple[str, ...] = ()) -> list:
    """The text pieces a RowTracker sends for one row that generates ``tokens`` (until it is done)."""
    sampling = Sampling(max_tokens or len(tokens) + 1, 0.0, 1.0, None, stop)
    job = RecordedJob(PROMPT, "mas", sampling, None, 0)
    tracker = RowTracker([job], tokenizer, {tokenizer.eos_token_id}, byte_ids_of(tokenizer))
    for token in tokens:
        if tracker.done[0]:
            break
        tracker(torch.tensor([[token]]), None)
    tracker.finish_all()
    kinds = [kind for kind, _ in job.sent]
    assert kinds == ["text"] * (len(kinds) - 1) + ["done"]
    return [piece for _, piece in job.sent[:-1]]


def whole(tokenizer, tokens: list[int]) -> str:
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_stories_tokenizer_falls_back_to_bytes(stories_tokenizer):
    """The tests below need a byte-fallback tokenizer: stories260K's (a llama2.c sentencepiece) is one."""
    ids = stories_tokenizer("猫", add_special_tokens=False).input_ids
    assert stories_tokenizer.convert_ids_to_tokens(ids)[-3:] == ["<0xE7>", "<0x8C>", "<0xAB>"]
    assert len(byte_token_ids(stories_tokenizer)) == 256


@pytest.mark.parametrize(
    "text", ["Look 😀 at the 猫 now", "猫猫😀😀", "😀", "a 猫 b 猫\n😀x", "é ñ ü 日本語 🙂👍🏽 ok"]
)
def test_multibyte_characters_are_streamed_whole(stories_tokenizer, text):
    """Before: one U+FFFD held back of the one per byte that a partial character decodes to; the others
    were sent, and the text after the character was cut by as many (``'Look ��at the � now'``)."""
    tokens = stories_tokenizer(text, add_special_tokens=False).input_ids
    pieces = tracked(stories_tokenizer, tokens)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize(
    "bytes_, after",
    [
        ([0xE7, 0x8C, 0xAB, 0xFF], "▁a"),  # a complete 猫, then a stray byte: the run decodes to 4 U+FFFD
        ([0xE7, 0x8C, 0xAB, 0xE7], "▁a"),  # a complete 猫, then a partial one
        ([0x4C, 0x8D], "▁a"),  # an ASCII byte, then a stray one
    ],
)
@pytest.mark.parametrize("special", [False, True])
def test_a_run_of_byte_tokens_is_sent_when_it_ends(stories_tokenizer, bytes_, after, special):
    """The decoder decodes a run of byte tokens as one (special tokens skipped): invalid UTF-8 anywhere in it
    turns every byte into U+FFFD, the characters it had completed too."""
    tokens = stories_tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in bytes_] + [after])
    if special:  # <s> (skipped) inside the run
        tokens = tokens[:3] + [stories_tokenizer.bos_token_id] + tokens[3:]
    assert "".join(tracked(stories_tokenizer, tokens)) == whole(stories_tokenizer, tokens)
    for cut in range(1, len(tokens) + 1):  # and when max_tokens ends the row inside the run
        assert "".join(tracked(stories_tokenizer, tokens, max_tokens=cut)) == whole(
            stories_tokenizer, tokens[:cut]
        )


def token_sequences(tokenizer):
    """Token ids as a model may generate them: any id (special ones, stray bytes), and texts of emoji, CJK and
    ASCII as the tokenizer encodes them."""
    texts = st.text(alphabet=st.sampled_from("ab .\n猫日本😀🙂é"), max_size=8).map(
        lambda text: tokenizer(text, add_special_tokens=False).input_ids
    )
    parts = [texts, st.lists(st.integers(0, vocab_size(tokenizer) - 1), max_size=4)]
    if byte_ids_of(tokenizer):
        parts.append(st.lists(st.sampled_from(sorted(byte_ids_of(tokenizer))), min_size=1, max_size=5))
    return st.lists(st.one_of(*parts), max_size=6).map(lambda parts: sum(parts, []))


@pytest.mark.parametrize("name", ["stories_tokenizer", "llama3_tokenizer"])  # byte fallback, byte-level BPE
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streamed_pieces_join_to_the_whole_decode(request, name, data):
    """For any token sequence, ended by EOS, by max_tokens or by generate: what is sent is the decode of all."""
    tokenizer = request.getfixturevalue(name)
    tokens = data.draw(token_sequences(tokenizer))
    assert "".join(tracked(tokenizer, tokens)) == whole(tokenizer, tokens)
    cut = data.draw(st.integers(1, len(tokens) + 1))
    assert "".join(tracked(tokenizer, tokens, max_tokens=cut)) == whole(tokenizer, tokens[:cut])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(alphabet=st.sampled_from("ab .\n猫日本😀🙂é"), max_size=16),
    stop=st.sampled_from(["b.", "猫 ", "😀"]),
)
def test_a_stop_string_cuts_the_whole_decode(stories_tokenizer, text, stop):
    tokens = stories_tokenizer(text, add_special_tokens=False).input_ids
    decoded = stories_tokenizer.decode(tokens)
    expected = decoded[: decoded.find(stop)] if stop in decoded else decoded
    assert "".join(tracked(stories_tokenizer, tokens, stop=(stop,))) == expected
