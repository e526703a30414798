"""The OpenAI wire format that ``segmask serve`` speaks: request schemas and error bodies.

Pure data: no model, no torch, no FastAPI app. A request body is parsed with its schema
(``ChatCompletionRequest.model_validate_json(raw)``), then ``check_supported()`` refuses the OpenAI options
the server does not implement (:data:`UNSUPPORTED`, one table for both endpoints). Every refusal is an
:class:`APIError`, answered with OpenAI's error body.
The two endpoints word their answers differently; :data:`CHAT` and :data:`COMPLETION` say how.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from segmask.policies import MaskPolicy
from segmask.segments import ROLES

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
INT64 = (-(2**63), 2**63 - 1)  # torch.manual_seed's range includes it; beyond it a seed is refused

# OpenAI request fields segmask serve does not implement, each with the values that mean "not used" (a
# client may send those). Any other value is refused with a 400 naming the field; fields not listed here
# and not in the schemas (user, metadata, store, ...) are ignored, as they change nothing in an answer.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


def _unused(value: Any, neutral: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of the ``neutral`` values, type for type (``true`` is not ``1``)."""
    return any(value == v and type(value) is type(v) for v in neutral)


# --------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _param(loc: Sequence[Any]) -> str | None:
    """A pydantic error location as an OpenAI ``param`` (``messages.0.role``), without union branch names."""
    parts = [str(p) for p in loc if isinstance(p, int) or re.fullmatch(r"[a-z_][a-z0-9_]*", str(p))]
    parts = [p for p in parts if p not in {"str", "int", "float", "bool", "list", "dict", "none"}]
    return ".".join(parts) or None


def validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    param = _param(first["loc"])
    where = f"{param}: " if param else "request body: "
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, where + message, param=param, code="invalid_value")


# --------------------------------------------------------------------------------------------- schemas


class _Schema(BaseModel):
    # strict: "3" is not an int, 1 is not a bool; unknown fields are ignored (clients send many)
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class ChatMessage(_Schema):
    role: str
    content: str | list[TextPart] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return role

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Schema):
    include_usage: bool = False


class BaseRequest(_Schema):
    """Fields shared by both endpoints; other fields are kept (``model_extra``) for :meth:`check_supported`."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    mask_policy: MaskPolicy | None = None

    def check_supported(self) -> None:
        """Refuse any :data:`UNSUPPORTED` field sent with a value that asks for something; too many stops."""
        extra = self.model_extra or {}
        for name, neutral in UNSUPPORTED.items():
            if name in extra and not _unused(extra[name], neutral):
                accepted = " or ".join(json.dumps(v) for v in neutral if v is not None)
                hint = f"leave it out or send {accepted}" if accepted else "leave it out"
                raise APIError(
                    400,
                    f"{name} is not supported by segmask serve: {hint}",
                    param=name,
                    code="unsupported_value",
                )
        if len(self.stops()) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop", code="invalid_value")

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)

    def token_limit(self) -> tuple[int | None, str]:
        """The completion's token limit (None: up to the rest of the context) and the parameter that set it."""
        return self.max_tokens, "max_tokens"


class ChatCompletionRequest(BaseRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise APIError(400, "messages must not be empty", param="messages", code="invalid_value")

    def token_limit(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(BaseRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    def token_limit(self) -> tuple[int | None, str]:
        return self.max_tokens or DEFAULT_COMPLETION_TOKENS, "max_tokens"


# --------------------------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class ResponseFormat:
    """How one endpoint words its answers: the id and object names, and a choice's content, whole or streamed.

    ``content(text)`` is a whole answer's text in a choice; ``delta(piece)`` a streamed piece in a chunk's
    choice (``None``: the closing chunk, which carries only the finish reason); ``opening`` the content
    of a first chunk sent before any text, if the endpoint has one.
    """

    id_prefix: str
    object: str
    chunk_object: str
    content: Callable[[str], dict]
    delta: Callable[[str | None], dict]
    opening: dict | None = None

    def header(self, model: str, policy: MaskPolicy, stream: bool) -> dict:
        """The fields every response (or every chunk of one stream) starts with."""
        return {
            "id": self.id_prefix + uuid.uuid4().hex,
            "object": self.chunk_object if stream else self.object,
            "created": int(time.time()),
            "model": model,
            "mask_policy": policy,
        }

    def choice(self, text: str, reason: str) -> dict:
        return {"index": 0, **self.content(text), "finish_reason": reason, "logprobs": None}

    def chunk(self, header: dict, content: dict, reason: str | None = None) -> dict:
        return {**header, "choices": [{"index": 0, **content, "finish_reason": reason, "logprobs": None}]}


CHAT = ResponseFormat(
    id_prefix="chatcmpl-",
    object="chat.completion",
    chunk_object="chat.completion.chunk",
    content=lambda text: {"message": {"role": "assistant", "content": text}},
    delta=lambda piece: {"delta": {} if piece is None else {"content": piece}},
    opening={"delta": {"role": "assistant", "content": ""}},
)
COMPLETION = ResponseFormat(
    id_prefix="cmpl-",
    object="text_completion",
    chunk_object="text_completion",
    content=lambda text: {"text": text},
    delta=lambda piece: {"text": piece or ""},
)


def finish_reason(reason: str) -> str:
    """OpenAI's finish reason for the engine's (``stop``, ``length``, ``cancelled``)."""
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def event(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
