"""Does ``segmask serve`` hold up under a bounded load: errors, latency p50/p99 and memory before and after.

    python benchmarks/serve_load.py                                  # stories260K, 200 requests, 16 at a time
    python benchmarks/serve_load.py --requests 400 --concurrency 32 --max-queue 16

A server for the model (stories260K by default, with the tests' small chat template when it has none) runs
in this process on a free loopback port, and stops with the run; nothing listens anywhere else. Phases:
    load        --requests requests, --concurrency at a time: chat and completions, streamed or not, greedy
                and sampled; every --disconnect-every-th client leaves early (a stream closed after its
                first chunk, or a reply given up on after 50 ms): the server must free its place or row
    burst       with the model thread busy, --max-queue + --burst requests at once: those past the queue
                must get 429 with Retry-After, the rest answers
Reported per phase: answered (200), refused (429), left (client disconnects), errors (anything else:
must be 0), latency p50 and p99 of the answered requests in ms, requests per second; then the server's
process memory (RSS) before the load and after it, and whether ``/health`` still answers within 1 s.
The whole run is bounded by --deadline seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (  # tests/conftest.py's STORIES_CHAT_TEMPLATE
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NAME = "load"
TOPICS = ["a cat", "a dog", "the sea", "a red ball", "Lily", "the park", "a big tree", "Tom"]
SYSTEM = {"role": "system", "content": "You tell short stories."}


def rss_mb() -> float:
    """This process's resident memory (the server runs in it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, on systems without /proc


class Server:
    """``segmask.serving.create_app`` under uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, app) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def request(i: int, max_tokens: int) -> tuple[str, dict]:
    """The i-th request of the load: a path and a body, mixing endpoints, streaming and sampling."""
    body = {"model": NAME, "max_tokens": max_tokens, "temperature": 0 if i % 3 else 0.8}
    if i % 4 == 3:
        return "/v1/completions", {**body, "prompt": f"Once upon a time, {TOPICS[i % 8]}"}
    messages = [SYSTEM, {"role": "user", "content": f"Tell me about {TOPICS[i % 8]}."}]
    return "/v1/chat/completions", {**body, "messages": messages, "stream": bool(i % 2)}


async def one(http: httpx.AsyncClient, url: str, body: dict, leave: bool) -> tuple[str, float]:
    """One request's outcome (``ok``, ``429``, ``left`` or ``error <status>``) and its latency."""
    started = time.monotonic()
    try:
        if body.get("stream"):
            async with http.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return _outcome(response), time.monotonic() - started
                async for line in response.aiter_lines():
                    if leave and line.startswith("data:"):
                        return "left", time.monotonic() - started  # closes the stream unread
                    if line == "data: [DONE]":
                        break
                return "ok", time.monotonic() - started
        if leave:
            try:
                response = await http.post(url, json=body, timeout=0.05)
            except httpx.TimeoutException:
                return "left", time.monotonic() - started
            return _outcome(response), time.monotonic() - started  # answered before it could leave
        response = await http.post(url, json=body)
        return _outcome(response), time.monotonic() - started
    except httpx.HTTPError as error:
        return f"error {type(error).__name__}", time.monotonic() - started


def _outcome(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "ok"
    if response.status_code == 429 and response.headers.get("retry-after"):
        return "429"
    return f"error {response.status_code}"


async def load(url: str, args: argparse.Namespace) -> list[tuple[str, float]]:
    limit = asyncio.Semaphore(args.concurrency)

    async def limited(i: int, http: httpx.AsyncClient):
        async with limit:
            path, body = request(i, args.max_tokens)
            return await one(
                http, url + path, body, leave=i % args.disconnect_every == args.disconnect_every - 1
            )

    async with httpx.AsyncClient(
        timeout=120, limits=httpx.Limits(max_connections=args.concurrency * 2)
    ) as http:
        return await asyncio.gather(*(limited(i, http) for i in range(args.requests)))


async def burst(url: str, args: argparse.Namespace) -> list[tuple[str, float]]:
    """Occupy the model with one long request, then send max_queue + burst requests at once."""
    count = args.max_queue + args.burst
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=count + 8)) as http:
        long = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
        blocker = asyncio.create_task(one(http, url + "/v1/completions", long, leave=False))
        while (await http.get(url + "/health")).json()["running"] == 0:
            await asyncio.sleep(0.01)
        bodies = [request(i, args.max_tokens) for i in range(count)]
        results = await asyncio.gather(*(one(http, url + path, body, leave=False) for path, body in bodies))
        await blocker
        return results


def summary(name: str, results: list[tuple[str, float]], seconds: float) -> dict:
    outcomes = [o for o, _ in results]
    answered = sorted(t for o, t in results if o == "ok")
    return {
        "phase": name,
        "requests": len(results),
        "answered": outcomes.count("ok"),
        "refused_429": outcomes.count("429"),
        "left": outcomes.count("left"),
        "errors": len([o for o in outcomes if o.startswith("error")]),
        "p50_ms": statistics.median(answered) * 1000 if answered else float("nan"),
        "p99_ms": answered[min(len(answered) - 1, int(0.99 * len(answered)))] * 1000
        if answered
        else float("nan"),
        "req_per_s": len(results) / seconds,
        "error_kinds": sorted(set(o for o in outcomes if o.startswith("error"))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "stories260K"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--burst", type=int, default=32, help="requests past --max-queue in the burst")
    parser.add_argument("--disconnect-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a tiny model)")
    parser.add_argument("--deadline", type=float, default=600, help="seconds before the run gives up")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from segmask.loading import load_model
    from segmask.serving import ServeConfig, create_app

    model, tokenizer, policy = load_model(args.model)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    config = ServeConfig(model_name=NAME, max_batch=args.max_batch, max_queue=args.max_queue)
    app = create_app(model, tokenizer, policy, config)
    print(
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{Path(args.model).name} ({policy}), max_batch {args.max_batch}, max_queue {args.max_queue}, "
        f"max_tokens {args.max_tokens}; loopback only"
    )

    async def run(url: str) -> tuple[list[dict], float, float, float, dict]:
        async with httpx.AsyncClient(timeout=60) as http:  # warm-up: one of each kind
            for i in range(4):
                path, body = request(i, args.max_tokens)
                await one(http, url + path, body, leave=False)
        gc.collect()
        before = rss_mb()
        rows = []
        for name, phase in (("load", load), ("burst", burst)):
            started = time.monotonic()
            results = await phase(url, args)
            rows.append(summary(name, results, time.monotonic() - started))
        async with httpx.AsyncClient(timeout=30) as http:
            while True:
                health = (await http.get(url + "/health")).json()
                if health["queued"] == 0 and health["running"] == 0:
                    break
                await asyncio.sleep(0.05)
            started = time.monotonic()
            assert (await http.get(url + "/health")).status_code == 200
            health_s = time.monotonic() - started
        gc.collect()
        return rows, before, rss_mb(), health_s, health

    with Server(app) as server:
        try:
            rows, before, after, health_s, health = asyncio.run(
                asyncio.wait_for(run(server.url), args.deadline)
            )
        except asyncio.TimeoutError:
            print(f"gave up after --deadline {args.deadline:.0f} s", file=sys.stderr)
            return 1

    header = f"{'phase':<6} {'requests':>8} {'answered':>8} {'429':>5} {'left':>5} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}"
    print(header)
    for r in rows:
        print(
            f"{r['phase']:<6} {r['requests']:>8} {r['answered']:>8} {r['refused_429']:>5} {r['left']:>5} "
            f"{r['errors']:>6} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['req_per_s']:>7.1f}"
        )
        if r["error_kinds"]:
            print(f"       errors: {', '.join(r['error_kinds'])}")
    print(
        f"RSS before {before:.0f} MB, after {after:.0f} MB ({after / before:.2f}x); "
        f"/health after the load: {health_s * 1000:.0f} ms"
    )
    print(
        f"server: {health['completed']} completed, {health['cancelled']} cancelled by their clients, "
        f"{health['batches']} batches, {health['generated_tokens']} tokens, queue and batch empty at the end"
    )
    failed = sum(r["errors"] for r in rows) or (rows[1]["refused_429"] == 0) or health_s > 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
