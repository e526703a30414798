"""The batching engine of ``segmask serve``: jobs, the scheduler that batches them, the model thread.

No HTTP here: a :class:`Job` carries an encoded prompt and its :class:`Sampling`, and sends its results
back as events. The :class:`Scheduler` (on the event loop) queues jobs and hands batches of jobs that
sample alike to the :class:`Engine` (one worker thread), which prefills each row under the MAS mask
(reusing the :class:`~segmask.serving.prefix_cache.PrefixCache`) and decodes the batch with transformers'
``generate``; a :class:`RowTracker` streams each row's text and stops it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from segmask.detokenize import TextStream, byte_token_ids
from segmask.generation import (
    decode,
    eos_token_ids,
    generate_ids,
    left_pad,
    pad_token_id,
    prefill_for_decoding,
)
from segmask.hook import layer_masks
from segmask.policies import MaskPolicy
from segmask.segments import Encoded
from segmask.serving.prefix_cache import PrefixCache, stack_left_padded

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- jobs


# Temperatures below this decode greedily, as in vLLM: sampling at them is greedy in all but name, and
# logits / temperature overflow to inf (then nan probabilities) long before it reaches 0 (1e-38 does).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Sampling:
    """How one request decodes: greedy when ``temperature < GREEDY_BELOW`` (0 included)."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def batch_key(self, job_id: int) -> tuple:
        """Jobs with equal keys decode in one ``generate`` call; a seeded sampling job runs alone."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", job_id)
        return ("sample", self.temperature, self.top_p)

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass(eq=False)
class Job:
    """One request's prompt and sampling, and the channel its results travel back on.

    Made by :meth:`Engine.new_job`, which numbers its jobs. The model thread calls :meth:`emit`; the
    handler awaits ``events``: ``("text", piece)`` any number of times, then ``("done", finish_reason)``
    or ``("error", message)``.
    """

    prompt: Encoded
    policy: MaskPolicy
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    id: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.input_ids)

    def emit(self, kind: str, value: str) -> None:
        """Send an event to the handler (safe from any thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


# --------------------------------------------------------------------------------------------- engine


class RowTracker(StoppingCriteria):
    """Per-row bookkeeping at every decoding step of one batch.

    Called by ``generate`` after each new token (``input_ids`` ``[B, L + t]``); returns ``[B]`` bools,
    True for rows that are done: EOS (``finish_reason="stop"``), a stop string (``"stop"``, the text cut
    before it), ``max_tokens`` reached (``"length"``), or a client that left (``"cancelled"``, nothing
    sent). Text is sent as it becomes final (:class:`segmask.detokenize.TextStream`), so that the pieces
    sent join to the decode of all the row's tokens; held back on top is anything that could still become
    a stop string.
    """

    def __init__(
        self, jobs: Sequence[Job], tokenizer, eos_ids: set[int], byte_ids: frozenset[int] = frozenset()
    ) -> None:
        self.jobs = list(jobs)
        self.eos_ids = eos_ids
        self.streams = [
            TextStream(tokenizer, byte_ids, hold=max((len(s) - 1 for s in job.sampling.stop), default=0))
            for job in self.jobs
        ]
        self.done = [False] * len(self.jobs)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new_tokens = input_ids[:, -1].tolist()
        for row, (job, token) in enumerate(zip(self.jobs, new_tokens)):
            if not self.done[row]:
                self._step(row, job, token)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _step(self, row: int, job: Job, token: int) -> None:
        if job.cancelled.is_set():
            self._finish(row, "cancelled", None)
            return
        job.completion_tokens += 1
        stream = self.streams[row]
        if token in self.eos_ids:
            self._finish(row, "stop", stream.text())
            return
        stream.add(token)
        text = stream.text()
        cut = min((i for i in (text.find(s) for s in job.sampling.stop) if i >= 0), default=None)
        if cut is not None:
            self._finish(row, "stop", text[:cut])
        elif len(stream.tokens) >= job.sampling.max_tokens:
            self._finish(row, "length", text)
        else:
            self._emit(row, stream.send(text, stream.final(text)))

    def finish_all(self) -> None:
        """End the rows ``generate`` stopped without us (its own length limit)."""
        for row in range(len(self.jobs)):
            if not self.done[row]:
                self._finish(row, "length", self.streams[row].text())

    def _emit(self, row: int, piece: str) -> None:
        if piece:
            self.jobs[row].emit("text", piece)

    def _finish(self, row: int, reason: str, text: str | None) -> None:
        self.done[row] = True
        if text is not None:
            self._emit(row, self.streams[row].flush(text))
        self.jobs[row].emit("done", reason)


class Engine:
    """Runs batches of jobs on the model: :meth:`run` on one thread only (the scheduler's worker).

    Rows are prefilled one by one against their prefix-cache hit, then stacked left-padded and decoded
    together. Without a prefix cache (disabled, or a model with sliding-window layers) the batch is
    prefilled as one left-padded batch instead.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, prefix_cache: PrefixCache | None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.pad_id = pad_token_id(tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.byte_ids = byte_token_ids(tokenizer)
        self._job_ids = itertools.count()

    def new_job(self, prompt: Encoded, policy: MaskPolicy, sampling: Sampling) -> Job:
        """A job for this engine, numbered in its own sequence; call it on the event loop that awaits it."""
        return Job(prompt, policy, sampling, asyncio.get_running_loop(), next(self._job_ids))

    def run(self, jobs: Sequence[Job]) -> None:
        """Generate for ``jobs`` (which share a batch key); every job ends with a done or error event."""
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if not jobs:
            return
        tracker = RowTracker(jobs, self.tokenizer, self.eos_ids, self.byte_ids)
        try:
            with torch.inference_mode():
                self._generate(jobs, tracker)
            tracker.finish_all()
        except Exception as error:  # a bug or an out-of-memory: fail these requests, keep serving
            logger.exception("generation failed")
            for row, job in enumerate(jobs):
                if not tracker.done[row]:
                    tracker.done[row] = True
                    job.emit("error", f"generation failed: {type(error).__name__}: {error}")

    def _generate(self, jobs: list[Job], tracker: RowTracker) -> None:
        batch = left_pad([job.prompt for job in jobs], self.pad_id)
        sampling = jobs[0].sampling
        kwargs = {
            "max_new_tokens": max(job.sampling.max_tokens for job in jobs),
            "pad_token_id": self.pad_id,
            "stopping_criteria": StoppingCriteriaList([tracker]),
            **sampling.generate_kwargs(),
        }
        if self.prefix_cache is None:  # the batch prefilled as one: exactly segmask.generation's path
            # (prefill draws no random numbers, so it may run inside the seeded stream)
            with random_stream(sampling, self.model.device):
                generate_ids(
                    self.model, batch["input_ids"], batch["segment_ids"], batch["attention_mask"], **kwargs
                )
            return
        rows = [self._prefill_row(job) for job in jobs]
        cache = rows[0] if len(rows) == 1 else stack_left_padded(rows, self.model.config)
        with random_stream(sampling, self.model.device):
            decode(self.model, batch["input_ids"], batch["attention_mask"], cache, **kwargs)

    def _prefill_row(self, job: Job):
        """One row's cache of all prompt tokens but the last, reusing the longest cached prefix."""
        assert self.prefix_cache is not None
        ids, segments = job.prompt.input_ids, job.prompt.segment_ids
        use_cache = job.policy != "prefix"  # one segment spans the prompt: nothing reusable
        hit = self.prefix_cache.lookup(ids, segments) if use_cache else None
        start = hit.length if hit is not None else 0
        cache = prefill_for_decoding(
            self.model,
            torch.tensor([ids[start:]]),
            torch.tensor([segments[start:]]),
            None,
            hit.cache if hit is not None else None,
        )
        job.cached_tokens = start
        if use_cache:
            self.prefix_cache.store(ids, segments, cache)
        return cache


@contextlib.contextmanager
def random_stream(sampling: Sampling, device: torch.device) -> Iterator[None]:
    """A seeded sampling job (it runs alone) draws from its own stream and leaves the shared one as it was."""
    if sampling.seed is None or sampling.greedy:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(sampling.seed)
        yield


def supports_row_caches(model: torch.nn.Module) -> bool:
    """Whether per-row caches can be stacked and reused: every layer keeps full attention."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    try:
        return all(layer.window is None for layer in layer_masks(config.get_text_config(decoder=True)))
    except ValueError:  # layer types segmask cannot describe: no stacking, no reuse
        return False


# --------------------------------------------------------------------------------------------- scheduler


class QueueFull(Exception):
    """:meth:`Scheduler.submit` refused a job: ``waiting`` jobs already wait (the server answers 429)."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests waiting")
        self.waiting = waiting


class Scheduler:
    """A bounded queue of jobs and the loop that feeds them, in batches, to the model thread.

    Lives on the event loop; :meth:`submit` raises :class:`QueueFull` when ``max_queue`` jobs wait.
    A batch is the oldest job plus up to ``max_batch - 1`` later ones with the same batch key.
    """

    def __init__(self, engine: Engine, max_batch: int, max_queue: int) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.completed = 0
        self.cancelled = 0
        self.batches = 0
        self.generated_tokens = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segmask-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._feed())

    async def stop(self) -> None:
        for job in list(self.waiting) + self.running:
            job.cancelled.set()
        for job in self.waiting:
            job.emit("error", "the server is shutting down")
        self.waiting.clear()
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(len(self.waiting))
        self.waiting.append(job)
        self._wakeup.set()

    def withdraw(self, job: Job) -> None:
        """The client has gone: drop the job if it waits, stop its row if it runs."""
        if job.cancelled.is_set():
            return
        job.cancelled.set()
        self.cancelled += 1
        try:
            self.waiting.remove(job)
        except ValueError:
            pass

    def _take(self) -> list[Job]:
        first = self.waiting.popleft()
        key = first.sampling.batch_key(first.id)
        batch = [first]
        for job in list(self.waiting):
            if len(batch) == self.max_batch:
                break
            if job.sampling.batch_key(job.id) == key:
                batch.append(job)
                self.waiting.remove(job)
        return batch

    async def _feed(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take()
            self.running = batch
            try:
                await loop.run_in_executor(self._executor, self.engine.run, batch)
            except Exception:  # Engine.run reports errors itself; this is a last resort
                logger.exception("batch failed")
                for job in batch:
                    job.emit("error", "generation failed")
            finally:
                self.batches += 1
                self.completed += len(batch)
                self.generated_tokens += sum(job.completion_tokens for job in batch)
                self.running = []
