"""vLLM's OpenAI server with the segmask plugin, serving a model that ``segmask train`` produced: greedy
token ids of chat (one turn, multi-turn, concurrent requests of different lengths) and raw completions
equal ``segmask.generate``'s under the mask saved in its segmask.json. One server start (about a minute on
2 cores: vLLM's API server and engine core each import vLLM, and each loads the plugin).

Run by ``make test-vllm`` (its own environment, ``.venv-vllm``); skipped where vLLM is not installed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import write_recipe

pytest.importorskip("vllm.entrypoints", reason="vllm is not installed (make test-vllm)")

import httpx  # noqa: E402
from openai import OpenAI  # noqa: E402
from tiny_models import CONVERSATIONS, NEW_TOKENS, RAW_PROMPT, build_model, segmask_tokens  # noqa: E402

from segmask.cli import main  # noqa: E402
from segmask.integrations.vllm.plugin import POLICY_ENV  # noqa: E402

START_SECONDS = 300
RECORDS = [
    {"messages": [{"role": "user", "content": f"What did {name} see?"},
                  {"role": "assistant", "content": f"{name} saw a {thing}."}]}
    for name in ("Lily", "Tom", "Sue") for thing in ("cat", "dog")
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A full fine-tune of a random Llama by ``segmask train`` (mas, the sink on by default), 3 steps."""
    folder = tmp_path_factory.mktemp("train")
    base = build_model(folder / "base", "llama", "chatml_smollm2.jinja", seed=1)
    recipe = write_recipe(
        folder,
        base,
        RECORDS,
        "batch_size: 2\ngradient_accumulation_steps: 1\nlearning_rate: 1e-3\nwarmup_steps: 0\nlora_r: 0\n"
        "cutoff_len: 256\nlogging_steps: 1\n",
    )
    output = folder / "run"
    assert main(["train", str(recipe), "--mask", "mas", "--max-steps", "3", "--output", str(output)]) == 0
    run = json.loads((output / "segmask.json").read_text())
    assert (run["policy"], run["adapter"], run["causal_sink"]) == ("mas", False, True)
    return output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on ``model`` as the README starts it."""

    def __init__(self, model: Path, log: Path, environ: dict[str, str]) -> None:
        self.model, self.port = str(model), free_port()
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "512",
            "--enforce-eager", "--no-enable-prefix-caching", "--no-enable-chunked-prefill",
        ]  # fmt: skip
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environ)
        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0)

    def wait(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"vLLM did not start in {START_SECONDS} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def chat(self, messages: list[dict]) -> list[int]:
        response = self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
            extra_body={"return_token_ids": True},
        )  # fmt: skip
        return response.choices[0].token_ids

    def complete(self, prompt: str) -> list[int]:
        response = self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
            extra_body={"return_token_ids": True},
        )  # fmt: skip
        return response.choices[0].token_ids


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """The server on the trained run, as users start it (engine core in its own process)."""
    environ = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", POLICY_ENV):
        environ.pop(name, None)
    server = Server(trained, tmp_path_factory.mktemp("server") / "vllm.log", environ)
    try:
        server.wait()
        yield server
    finally:
        server.stop()


def test_chat_equals_segmask_generate(served, trained):
    expected = segmask_tokens(trained, CONVERSATIONS)
    assert [served.chat(conversation) for conversation in CONVERSATIONS] == expected
    with ThreadPoolExecutor(len(CONVERSATIONS)) as pool:  # concurrent: batched in one engine step
        assert list(pool.map(served.chat, CONVERSATIONS * 2)) == expected * 2
    assert expected != segmask_tokens(trained, CONVERSATIONS, policy="causal")


def test_a_raw_completion_equals_segmask_generate(served, trained):
    assert served.complete(RAW_PROMPT) == segmask_tokens(trained, [RAW_PROMPT])[0]
