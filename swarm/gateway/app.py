"""The gateway's FastAPI app: OpenAI's routes over one served model, the chat page, health and metrics.

    GET  /                      the chat page (static/index.html)
    GET  /health                200 when every block has an online peer, else 503 naming the missing blocks
    GET  /metrics               Prometheus text format (metrics.py)
    GET  /v1/models             the one served model
    POST /v1/completions        text completion; `stream: true` sends server-sent events
    POST /v1/chat/completions   chat completion over the chat template (chat_template.py); streams the same way

With an API key, every `/v1/` request needs `Authorization: Bearer KEY`; the page, health and metrics stay open.
Route handlers never block: tokenizing runs in worker threads, generation in `TextGenerator`'s.

A stream answers 200 only once its first text has been generated, so an error before that (no route through
the swarm: 503) still gets its own status. After that, an error is the stream's last event (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import swarm
from swarm.gateway.chat_template import render_chat
from swarm.gateway.errors import (
    from_exception,
    install_error_handlers,
    invalid_api_key,
    invalid_value,
    model_not_found,
    unsupported,
)
from swarm.gateway.generation import GenerationResult, SamplingParams, TextGenerator
from swarm.gateway.metrics import ENDPOINTS, GatewayMetrics
from swarm.gateway.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Health,
    ModelCard,
    ModelList,
    Usage,
)

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context's rest
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold events back


def build_app(
    generator: TextGenerator,
    *,
    model_name: str,
    api_key: str | None = None,
    metrics: GatewayMetrics | None = None,
) -> FastAPI:
    """The app serving `generator`'s model as `model_name`."""
    metrics = metrics or GatewayMetrics()
    created = int(time.time())
    chat_page = importlib.resources.files("swarm.gateway").joinpath("static/index.html").read_text(encoding="utf-8")
    app = FastAPI(title="blockswarm gateway", version=swarm.__version__, summary="OpenAI-compatible API over a swarm")
    install_error_handlers(app)
    app.add_middleware(_ApiGate, api_key=api_key, metrics=metrics)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(chat_page)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        missing = await generator.missing_blocks()
        document = Health(status="unavailable" if missing else "ok", model=model_name, missing_blocks=missing)
        return JSONResponse(document.model_dump(), status_code=503 if missing else 200)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(request: CompletionRequest) -> Any:
        _check(request, model_name)
        prompt_ids = await _completion_prompt_ids(generator, request.prompt)
        max_tokens = generator.plan_max_tokens(len(prompt_ids), request.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS)
        chunks = _CompletionChunks(model_name)
        events = _observed(generator, metrics, prompt_ids, _sampling(request, max_tokens, ()))
        if request.stream:
            return await _event_stream(events, chunks, include_usage=request.include_usage())
        result = await _last(events)
        return CompletionResponse(
            id=chunks.id, created=chunks.created, model=model_name,
            choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)], usage=_usage(result),
        )  # fmt: skip

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(request: ChatCompletionRequest) -> Any:
        _check(request, model_name)
        messages = [(message.role, message.text()) for message in request.messages]
        prompt = await asyncio.to_thread(render_chat, generator.tokenizer, messages)
        prompt_ids = await asyncio.to_thread(generator.encode, prompt.text, add_special_tokens=prompt.add_special)
        max_tokens = generator.plan_max_tokens(len(prompt_ids), request.requested_max_tokens(), None)
        chunks = _ChatChunks(model_name)
        events = _observed(generator, metrics, prompt_ids, _sampling(request, max_tokens, prompt.stop))
        if request.stream:
            return await _event_stream(events, chunks, include_usage=request.include_usage())
        result = await _last(events)
        return ChatCompletionResponse(
            id=chunks.id, created=chunks.created, model=model_name,
            choices=[ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
            usage=_usage(result),
        )  # fmt: skip

    return app


def _check(request: CompletionRequest | ChatCompletionRequest, model_name: str) -> None:
    if request.model != model_name:
        raise model_not_found(request.model, model_name)
    if refused := request.unsupported_fields():
        field, why = next(iter(refused.items()))
        raise unsupported(field, why)


async def _completion_prompt_ids(generator: TextGenerator, prompt: str | list[Any]) -> list[int]:
    """The prompt's token ids; a prompt is text or token ids, alone or in a list of one."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        token_ids = await asyncio.to_thread(generator.encode, prompt)
    elif all(isinstance(token, int) for token in prompt):
        token_ids = list(prompt)
        if any(not 0 <= token < generator.vocab_size for token in token_ids):
            raise invalid_value(f"token ids must lie in [0, {generator.vocab_size})", "prompt")
    else:
        raise unsupported("prompt", "one prompt per request: several prompts in one request are not supported")
    if not token_ids:
        raise invalid_value("the prompt is empty", "prompt")
    return token_ids


def _sampling(
    request: CompletionRequest | ChatCompletionRequest, max_tokens: int, template_stop: Sequence[str]
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=tuple(dict.fromkeys((*request.stop_sequences(), *template_stop))),
        seed=request.seed,
    )


async def _observed(
    generator: TextGenerator, metrics: GatewayMetrics, prompt_ids: list[int], params: SamplingParams
) -> AsyncGenerator[str | GenerationResult, None]:
    """`generator.stream`, counted in the running-generations gauge and recorded in the metrics when it ends."""
    metrics.generations_running.inc()
    try:
        async with contextlib.aclosing(generator.stream(prompt_ids, params)) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    metrics.observe_generation(event)
                yield event
    finally:
        metrics.generations_running.dec()


async def _last(events: AsyncGenerator[str | GenerationResult, None]) -> GenerationResult:
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, GenerationResult):
                return event
    raise RuntimeError("the generation ended without a result")


def _usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.total_tokens,
    )


class _CompletionChunks:
    """The `text_completion` objects of one streamed completion."""

    def __init__(self, model_name: str):
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name

    def opening(self) -> list[BaseModel]:
        return []

    def text(self, piece: str) -> BaseModel:
        return self._chunk([CompletionChoice(text=piece)])

    def finish(self, result: GenerationResult) -> BaseModel:
        return self._chunk([CompletionChoice(text="", finish_reason=result.finish_reason)])

    def usage(self, result: GenerationResult) -> BaseModel:
        return self._chunk([], usage=_usage(result))

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


class _ChatChunks(_CompletionChunks):
    """The `chat.completion.chunk` objects of one streamed chat completion: the role first, then text deltas,
    then an empty delta with the finish reason."""

    def __init__(self, model_name: str):
        super().__init__(model_name)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"

    def opening(self) -> list[BaseModel]:
        return [self._chat([ChatChunkChoice(delta={"role": "assistant", "content": ""})])]

    def text(self, piece: str) -> BaseModel:
        return self._chat([ChatChunkChoice(delta={"content": piece})])

    def finish(self, result: GenerationResult) -> BaseModel:
        return self._chat([ChatChunkChoice(delta={}, finish_reason=result.finish_reason)])

    def usage(self, result: GenerationResult) -> BaseModel:
        return self._chat([], usage=_usage(result))

    def _chat(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


async def _event_stream(
    events: AsyncGenerator[str | GenerationResult, None], chunks: _CompletionChunks, *, include_usage: bool
) -> StreamingResponse:
    """Wait for the first event (errors before it are raised, so they get their own status), then stream."""
    first = await anext(events)

    async def body() -> AsyncIterator[str]:
        try:
            for chunk in chunks.opening():
                yield _sse(chunk)
            event = first
            while not isinstance(event, GenerationResult):
                yield _sse(chunks.text(event))
                event = await anext(events)
            yield _sse(chunks.finish(event))
            if include_usage:
                yield _sse(chunks.usage(event))
        except Exception as e:  # the status line is sent already: the error becomes the last event
            yield _sse(from_exception(e).body())
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=STREAM_HEADERS)


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _ApiGate:
    """ASGI middleware in front of the routes: checks the API key of `/v1/` requests before their body is read
    (a wrong key is refused whatever the body holds), and counts every answer of the API endpoints."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: GatewayMetrics):
        self.app = app
        self.api_key = api_key
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        endpoint = ENDPOINTS.get(scope["path"])
        answered = False

        async def counting_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                if endpoint is not None:
                    self.metrics.count_request(endpoint, message["status"])
            await send(message)

        if self.api_key is not None and not _authorized(scope, self.api_key):
            await invalid_api_key().response()(scope, receive, counting_send)
            return
        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not answered and endpoint is not None:
                self.metrics.count_request(endpoint, 500)  # the outermost middleware turns it into a 500
            raise


def _authorized(scope: Scope, api_key: str) -> bool:
    scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())
