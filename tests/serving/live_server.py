"""An in-process uvicorn server for the serving tests: the OpenAI-compatible app on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import uvicorn

from segmask.serving import ServeConfig, create_app

NAME = "stories"


class LiveServer:
    """A uvicorn server for ``app`` on a free loopback port, in a thread of this process."""

    def __init__(self, app) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=options.pop("api_key", "none"), max_retries=0, **options
        )

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()


@contextmanager
def live(model, tokenizer, **config):
    """A LiveServer serving ``model`` under the name NAME with the MAS policy and ``ServeConfig(**config)``."""
    with LiveServer(create_app(model, tokenizer, "mas", ServeConfig(model_name=NAME, **config))) as server:
        yield server
