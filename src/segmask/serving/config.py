"""ServeConfig (frozen): the server's limits and its causal sink, validated on construction.

Light on purpose (no torch, no FastAPI): ``segmask serve --help`` shows its fields at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from segmask.policies import CAUSAL_SINK_HELP_RUN


@dataclass(frozen=True)
class ServeConfig:
    """Server limits, and ``causal_sink``. ``max_context`` defaults to the model's
    ``max_position_embeddings``.

    ``causal_sink`` keeps token 0 of every prompt causal under ``mas``/``prefix``; ``None`` is each
    request's policy default in :func:`create_app` (:func:`segmask.policies.sink_on`: on under ``mas``),
    and :func:`serve` resolves it to the model's run value first (:func:`segmask.runs.resolve_settings`).
    """

    # metadata: each field's line in `segmask serve --help`
    max_batch: int = field(default=8, metadata={"help": "requests decoded together", "metavar": "N"})
    max_context: int | None = field(
        default=None, metadata={"help": "prompt + completion tokens (default: the model's)", "metavar": "N"}
    )
    max_queue: int = field(default=64, metadata={"help": "waiting requests before 429", "metavar": "N"})
    api_key: str | None = field(default=None, metadata={"help": "require this bearer key"})
    prefix_cache_mb: float = field(
        default=256.0, metadata={"help": "prefix cache memory (0: off)", "metavar": "MB"}
    )
    model_name: str = field(default="segmask", metadata={"help": "served model name"})
    retry_after_s: int = field(
        default=1, metadata={"help": "seconds a 429 answer asks the client to wait", "metavar": "S"}
    )
    max_messages: int = field(default=1024, metadata={"help": "messages in one chat request", "metavar": "N"})
    max_prompt_chars: int | None = field(
        default=None,
        metadata={
            "help": "characters of one prompt (default: more than the context can hold)",
            "metavar": "N",
        },
    )
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={"help": "tokens of one prompt (default: the context less one)", "metavar": "N"},
    )
    causal_sink: bool | None = field(default=None, metadata={"help": CAUSAL_SINK_HELP_RUN})

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "retry_after_s", "max_messages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompt_chars", "max_prompt_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string (or None for no key)")
        if self.api_key is not None and self.api_key != self.api_key.strip():
            raise ValueError(
                "api_key has leading or trailing whitespace, which no client can send; remove it"
            )
        if not self.model_name:
            raise ValueError("model_name must be non-empty")
        if self.causal_sink is not None and not isinstance(self.causal_sink, bool):
            raise ValueError(f"causal_sink must be true, false or None, got {self.causal_sink!r}")
