"""The wire format without a server: each endpoint's choices and chunks, usage, and OpenAI error bodies."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from segmask.serving.protocol import (
    CHAT,
    COMPLETION,
    ChatCompletionRequest,
    finish_reason,
    usage,
    validation_error,
)


def test_chat_and_completion_word_their_answers_as_openai_does():
    assert CHAT.choice("Hi", "stop") == {
        "index": 0,
        "message": {"role": "assistant", "content": "Hi"},
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert COMPLETION.choice("Hi", "length") == {
        "index": 0,
        "text": "Hi",
        "finish_reason": "length",
        "logprobs": None,
    }
    header = CHAT.header("m", "mas", stream=True)
    assert header["id"].startswith("chatcmpl-") and header["object"] == "chat.completion.chunk"
    assert CHAT.chunk(header, CHAT.opening)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert CHAT.chunk(header, CHAT.delta("a"))["choices"][0]["delta"] == {"content": "a"}
    closing = CHAT.chunk(header, CHAT.delta(None), "stop")["choices"][0]
    assert closing["delta"] == {} and closing["finish_reason"] == "stop"
    header = COMPLETION.header("m", "causal", stream=True)
    assert header["id"].startswith("cmpl-") and header["object"] == "text_completion"
    assert header["mask_policy"] == "causal" and COMPLETION.opening is None
    assert COMPLETION.chunk(header, COMPLETION.delta(None), "stop")["choices"][0]["text"] == ""


def test_finish_reason_and_usage():
    assert [finish_reason(r) for r in ("stop", "length", "cancelled")] == ["stop", "length", "stop"]
    assert usage(5, 3, 2) == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 2},
    }


def test_a_validation_error_names_its_param():
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate_json('{"model": "m", "messages": [{"role": "robot"}]}')
    error = validation_error(caught.value)
    assert (error.status, error.param, error.code) == (400, "messages.0.role", "invalid_value")
    assert error.body()["error"]["message"].startswith("messages.0.role: unknown role 'robot'")
