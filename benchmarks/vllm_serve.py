"""What does MAS cost when served by vLLM: throughput of the segmask plugin against vLLM's causal baseline
and against ``segmask serve``, with the same tiny model and the same requests.

    .venv-vllm/bin/python benchmarks/vllm_serve.py                     # 48 chats, 8 at a time, 32 new tokens
    .venv-vllm/bin/python benchmarks/vllm_serve.py --requests 96 --concurrency 16 --threads 1

Runs in the ``make test-vllm`` environment. A random Llama (hidden 256, 4 layers, 4 heads of 64, 2 KV heads,
stories260K's tokenizer, SmolLM2's chat template) is saved twice: plain (vLLM serves it causally) and with a
``segmask.json`` asking for ``mas`` (the plugin prefills it under the mask). Three servers run one after
the other on loopback ports, each answering the same chats (one to five turns, greedy, ``max_tokens``
new tokens, ``ignore_eos`` where the server allows it):

    vllm-causal    vLLM, the plain folder                 (the baseline)
    vllm-mas       vLLM with the plugin, the mas folder
    segmask-serve  segmask serve, the mas folder

vLLM runs with the flags the plugin needs for a MAS model (``--enforce-eager --no-enable-prefix-caching
--no-enable-chunked-prefill``) in both rows, so the rows differ by the mask alone. Printed: requests/s,
new tokens/s, p50 latency and each row's ratio to the baseline, with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
TEMPLATE = ROOT / "tests" / "fixtures" / "chat_templates" / "chatml_smollm2.jinja"
VLLM_FLAGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--no-enable-prefix-caching",
              "--no-enable-chunked-prefill"]  # fmt: skip
TOPICS = ["a cat", "a dog", "the sea", "a red ball", "Lily", "the park", "a big tree", "Tom"]


def build(folder: Path, policy: str | None) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    tokenizer.chat_template = TEMPLATE.read_text()
    tokenizer.save_pretrained(folder)
    if policy is not None:
        run = {"policy": policy, "base_model": "random", "adapter": False, "causal_sink": True}
        (folder / "segmask.json").write_text(json.dumps(run))
    return folder


def chat(i: int) -> list[dict]:
    """Request ``i``: a system prompt, then 1-5 user turns with answers between them."""
    messages = [{"role": "system", "content": "You tell short stories."}]
    for turn in range(i % 5 + 1):
        topic = TOPICS[(i + turn) % len(TOPICS)]
        if turn:
            messages.append({"role": "assistant", "content": f"There was {topic} in the story."})
        messages.append({"role": "user", "content": f"Tell me about {topic}, part {turn + 1}."})
    return messages


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(command: list[str], port: int, log: Path, threads: int) -> subprocess.Popen:
    # the same cores for every server: vLLM binds its threads to them, torch (segmask serve) runs as many
    environ = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
               "OMP_NUM_THREADS": str(threads)}  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environ)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()[-2000:]}")


def run(port: int, model: str, args: argparse.Namespace, vllm: bool) -> dict:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def one(i: int) -> tuple[float, int]:
        body = {"model": model, "messages": chat(i), "max_tokens": args.max_tokens, "temperature": 0}
        if vllm:
            body["ignore_eos"] = True
        start = time.perf_counter()
        response = httpx.post(url, json=body, timeout=600)
        response.raise_for_status()
        return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]

    one(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, range(args.requests)))
    seconds = time.perf_counter() - start
    return {
        "requests/s": args.requests / seconds,
        "tokens/s": sum(tokens for _, tokens in results) / seconds,
        "p50 ms": 1000 * statistics.median(latency for latency, _ in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores 0..N-1 for every server")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vllm_serve_") as folder:
        results = measure(Path(folder), args)
    load = os.getloadavg()
    print(f"# {platform.machine()}, {os.cpu_count()} cores ({args.threads} per server), load {load[0]:.1f}; "
          f"{args.requests} chats, {args.concurrency} at a time, {args.max_tokens} new tokens")  # fmt: skip
    base = results["vllm-causal"]
    print("| server | requests/s | tokens/s | p50 ms | tokens/s vs vllm-causal |\n|---|---|---|---|---|")
    for name, row in results.items():
        ratio = row["tokens/s"] / base["tokens/s"]
        print(
            f"| {name} | {row['requests/s']:.2f} | {row['tokens/s']:.1f} | {row['p50 ms']:.0f} | {ratio:.2f} |"
        )
    return 0


def measure(work: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Each server in turn on the same requests: its row of the table."""
    plain, mas = build(work / "plain", None), build(work / "mas", "mas")
    python = sys.executable
    rows = {
        "vllm-causal": ([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(plain), *VLLM_FLAGS],
                        str(plain), True),
        "vllm-mas": ([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(mas), *VLLM_FLAGS],
                     str(mas), True),
        "segmask-serve": ([python, "-m", "segmask", "serve", "--model", str(mas), "--name", "mas"], "mas", False),
    }  # fmt: skip
    results = {}
    for name, (command, model, vllm) in rows.items():
        port = free_port()
        command = [*command, "--host", "127.0.0.1", "--port", str(port)]
        process = serve(command, port, work / f"{name}.log", args.threads)
        try:
            results[name] = run(port, model, args, vllm)
        finally:
            process.terminate()
            process.wait(60)
    return results


if __name__ == "__main__":
    sys.exit(main())
