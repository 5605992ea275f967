"""The OpenAI requests and responses the gateway speaks, as pydantic models (they also make its OpenAPI schema).

Unknown request fields are ignored, as OpenAI's own API does for fields a model does not use. Fields that
would change the answer in a way the gateway cannot honour (`n` > 1, penalties, `logit_bias`, `logprobs`, `echo`,
`suffix`, `best_of`, tools, JSON mode) are refused by `unsupported_fields()` instead of being silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["stop", "length"]
MAX_STOP_SEQUENCES = 4  # as OpenAI's API


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        sequences = [stop] if isinstance(stop, str) else stop or []
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not sequence for sequence in sequences):
            raise ValueError("stop sequences must not be empty")
        return stop

    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def unsupported_fields(self) -> dict[str, str]:
        """{field: why} for every field whose value the gateway cannot honour."""
        refused = {}
        if self.n != 1:
            refused["n"] = "only n=1 is supported; send several requests instead"
        if self.presence_penalty:
            refused["presence_penalty"] = "penalties are not supported"
        if self.frequency_penalty:
            refused["frequency_penalty"] = "penalties are not supported"
        if self.logit_bias:
            refused["logit_bias"] = "logit_bias is not supported"
        return refused


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def unsupported_fields(self) -> dict[str, str]:
        refused = super().unsupported_fields()
        if self.echo:
            refused["echo"] = "echo is not supported"
        if self.suffix:
            refused["suffix"] = "suffix (insertion) is not supported"
        if self.best_of not in (None, 1):
            refused["best_of"] = "only best_of=1 is supported"
        if self.logprobs is not None:
            refused["logprobs"] = "logprobs are not supported"
        return refused


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="takes precedence over max_tokens")
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported_fields(self) -> dict[str, str]:
        refused = super().unsupported_fields()
        if self.logprobs:
            refused["logprobs"] = "logprobs are not supported"
        if self.tools:
            refused["tools"] = "tool calls are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            refused["response_format"] = "only text responses are supported"
        return refused


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (with `stream: true`) one chunk of it: OpenAI uses the same object for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]  # {"role": "assistant", "content": ""} first, then {"content": "..."}, {} at the end
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "blockswarm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    missing_blocks: list[int]
