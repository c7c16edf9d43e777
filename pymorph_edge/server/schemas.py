"""Request bodies of the OpenAI-compatible API. Unknown fields are ignored (clients send many);
known fields are type-checked strictly, so a wrong type is a 400 naming the field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictFloat | StrictInt


class _Request(BaseModel):
    """Fields shared by both endpoints: OpenAI's, plus the llama.cpp sampling fields llama-cpp-python's server
    takes (min_p, typical_p, repeat_penalty, mirostat_*, grammar as GBNF text)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number = Field(default=1.0, ge=0, le=2)
    top_p: Number = Field(default=1.0, ge=0, le=1)
    top_k: StrictInt = Field(default=40, ge=0)
    min_p: Number = Field(default=0.05, ge=0, le=1)
    typical_p: Number = Field(default=1.0, ge=0, le=1)
    repeat_penalty: Number = Field(default=1.0, gt=0)
    mirostat_mode: Literal[0, 1, 2] = 0
    mirostat_tau: Number = Field(default=5.0, gt=0)
    mirostat_eta: Number = Field(default=0.1, gt=0)
    grammar: StrictStr | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(default=None, ge=0)
    logit_bias: dict[str, Number] | None = None
    frequency_penalty: Number = Field(default=0.0, ge=-2, le=2)  # OpenAI's ranges
    presence_penalty: Number = Field(default=0.0, ge=-2, le=2)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictInt]
    max_tokens: StrictInt | None = Field(default=16, ge=1)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: StrictStr | dict[str, Any] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr] = Field(min_length=1)
    model: StrictStr | None = None
