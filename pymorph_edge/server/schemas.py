"""Request bodies of the OpenAI-compatible API. Unknown fields are ignored (clients send many);
known fields are type-checked strictly, so a wrong type is a 400 naming the field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictFloat | StrictInt


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number = Field(default=1.0, ge=0, le=2)
    top_p: Number = Field(default=1.0, ge=0, le=1)
    top_k: StrictInt = Field(default=40, ge=0)
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
