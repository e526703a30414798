"""The batching engine without HTTP: each engine numbers its own jobs, batch keys group jobs that sample
alike (a seeded sampling job alone), and a full queue refuses a job with QueueFull."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoModelForCausalLM

from segmask.segments import Encoded
from segmask.serving.engine import Engine, QueueFull, Sampling, Scheduler

GREEDY = Sampling(max_tokens=4, temperature=0.0, top_p=1.0, seed=None, stop=())
SEEDED = Sampling(max_tokens=4, temperature=0.7, top_p=0.9, seed=1, stop=())
PROMPT = Encoded([1, 2, 3], [0, 0, 0], [-100] * 3)


@pytest.fixture(scope="module")
def engine(stories_path, stories_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    return Engine(model, stories_tokenizer, prefix_cache=None)


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
