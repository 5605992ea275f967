"""The peer's RPC surface: decode -> validate -> runtime -> encode. No model math lives here.

Every bad request is answered with an `ErrorReply` to that caller only; the peer keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from peer.kv_cache import KVCacheBudget
from peer.runtime import BlockRuntime
from swarm import messages
from swarm.errors import CacheFullError, ProtocolError, RequestRejected
from swarm.logs import short_id
from swarm.models import BlockSlice
from swarm.protocol import (
    RPC_BACKWARD,
    RPC_BACKWARD_STREAM,
    RPC_FORWARD,
    RPC_FORWARD_STREAM,
    RPC_INFERENCE,
    RPC_INFO,
    ErrorKind,
    ErrorReply,
    InferenceOpen,
    InferenceStep,
    PeerInfo,
    SpanRequest,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HandlerLimits:
    inference_max_length: int  # tokens per sequence in one inference session
    max_batch_size: int
    session_idle_timeout: float  # seconds a session may wait for its next step


class _Refusal(Exception):
    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.reply = ErrorReply(kind, message)


class BlockHandler:
    """Serves the hosted blocks over hivemind P2P: info, inference sessions, forward and backward."""

    def __init__(
        self,
        runtime: BlockRuntime,
        budget: KVCacheBudget,
        limits: HandlerLimits,
        peer_info: Callable[[], PeerInfo],
        accepting_sessions: Callable[[], bool] = lambda: True,
    ):
        self.runtime = runtime
        self.budget = budget
        self.limits = limits
        self._peer_info = peer_info
        self._accepting_sessions = accepting_sessions

    async def add_p2p_handlers(self, p2p: P2P) -> None:
        request_type = runtime_pb2.ExpertRequest
        await p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, request_type)
        await p2p.add_protobuf_handler(RPC_FORWARD, self.rpc_forward, request_type)
        await p2p.add_protobuf_handler(RPC_BACKWARD, self.rpc_backward, request_type)
        for name, handler in [
            (RPC_INFERENCE, self.rpc_inference),
            (RPC_FORWARD_STREAM, self.rpc_forward_stream),
            (RPC_BACKWARD_STREAM, self.rpc_backward_stream),
        ]:
            await p2p.add_protobuf_handler(name, handler, request_type, stream_input=True, stream_output=True)

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=messages.pack_metadata(self._peer_info().to_wire()))

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One session: reserve cache, then answer each step with the blocks' output, until the stream closes."""
        peer = short_id(context.remote_id)
        try:
            first = await self._next_request(requests)
            if first is None:
                return
            metadata = messages.unpack_metadata(first.metadata)
            if "open" not in metadata:
                raise ProtocolError("the first message of an inference stream must carry 'open'")
            session_open = InferenceOpen.from_wire(metadata["open"])
            span = self._span(session_open.start, session_open.end)
            self._check_session(session_open)
            with self.budget.reserve(session_open.cache_tokens):
                logger.debug("Session from %s opened: blocks %d:%d", peer, session_open.start, session_open.end)
                cache = span.new_cache()
                request: runtime_pb2.ExpertRequest | None = first
                while request is not None:
                    outputs = await self._inference_step(span, cache, session_open, request)
                    yield messages.response([outputs])
                    request = await self._next_request(requests)
                logger.debug("Session from %s closed", peer)
        except _Refusal as e:
            yield messages.error_response(e.reply)
        except Exception as e:
            yield messages.error_response(self._classify(e, peer))

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            metadata, tensors = messages.unpack_metadata(request.metadata), messages.tensors_of(request)
            return messages.response([await self._forward(metadata, tensors)])
        except Exception as e:
            return messages.error_response(self._classify(e, short_id(context.remote_id)))

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            metadata, tensors = await messages.read_chunked_messages(requests)
            outputs = await self._forward(metadata, tensors)
        except Exception as e:
            yield messages.error_response(self._classify(e, short_id(context.remote_id)))
            return
        for message in messages.to_chunked_messages(runtime_pb2.ExpertResponse, [outputs]):
            yield message

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            metadata, tensors = messages.unpack_metadata(request.metadata), messages.tensors_of(request)
            return messages.response([await self._backward(metadata, tensors)])
        except Exception as e:
            return messages.error_response(self._classify(e, short_id(context.remote_id)))

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            metadata, tensors = await messages.read_chunked_messages(requests)
            grads = await self._backward(metadata, tensors)
        except Exception as e:
            yield messages.error_response(self._classify(e, short_id(context.remote_id)))
            return
        for message in messages.to_chunked_messages(runtime_pb2.ExpertResponse, [grads]):
            yield message

    async def _inference_step(
        self, span: BlockSlice, cache: Any, session_open: InferenceOpen, request: runtime_pb2.ExpertRequest
    ) -> torch.Tensor:
        step = InferenceStep.from_wire(messages.unpack_metadata(request.metadata))
        (hidden_states,) = self._expect_tensors(messages.tensors_of(request), 1)
        self._check_hidden(hidden_states, span, max_batch=session_open.batch_size)
        if hidden_states.shape[0] != session_open.batch_size:
            raise _Refusal(
                ErrorKind.BAD_REQUEST, f"session batch is {session_open.batch_size}, step has {hidden_states.shape[0]}"
            )
        cached = cache.get_seq_length()
        if step.position != cached:
            raise _Refusal(
                ErrorKind.BAD_REQUEST, f"step starts at position {step.position}, the session holds {cached} tokens"
            )
        if step.position + hidden_states.shape[1] > session_open.max_length:
            raise _Refusal(
                ErrorKind.BAD_REQUEST,
                f"step would reach {step.position + hidden_states.shape[1]} tokens, "
                f"the session was opened for {session_open.max_length}",
            )
        return await self.runtime.inference_step(span, cache, hidden_states, step.position)

    async def _forward(self, metadata: dict[str, Any], tensors: list[torch.Tensor]) -> torch.Tensor:
        span_request = SpanRequest.from_wire(metadata)
        span = self._span(span_request.start, span_request.end)
        (hidden_states,) = self._expect_tensors(tensors, 1)
        self._check_hidden(hidden_states, span, max_batch=self.limits.max_batch_size)
        return await self.runtime.forward(span, hidden_states)

    async def _backward(self, metadata: dict[str, Any], tensors: list[torch.Tensor]) -> torch.Tensor:
        span_request = SpanRequest.from_wire(metadata)
        span = self._span(span_request.start, span_request.end)
        hidden_states, grad_outputs = self._expect_tensors(tensors, 2)
        self._check_hidden(hidden_states, span, max_batch=self.limits.max_batch_size)
        if grad_outputs.shape != hidden_states.shape:
            raise _Refusal(ErrorKind.BAD_REQUEST, "gradients must have the shape of the hidden states")
        return await self.runtime.backward(span, hidden_states, grad_outputs)

    async def _next_request(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest]
    ) -> runtime_pb2.ExpertRequest | None:
        try:
            return await asyncio.wait_for(anext(requests), timeout=self.limits.session_idle_timeout)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise _Refusal(ErrorKind.BAD_REQUEST, "session idle for too long; closed") from None

    def _span(self, start: int, end: int) -> BlockSlice:
        if not self.runtime.start <= start < end <= self.runtime.end:
            raise _Refusal(
                ErrorKind.BAD_REQUEST,
                f"blocks {start}:{end} are not served here; this peer hosts {self.runtime.start}:{self.runtime.end}",
            )
        return self.runtime.span(start, end)

    def _check_session(self, session_open: InferenceOpen) -> None:
        if not self._accepting_sessions():
            raise _Refusal(ErrorKind.UNAVAILABLE, "this peer is leaving and accepts no new sessions")
        if session_open.max_length > self.limits.inference_max_length:
            raise _Refusal(
                ErrorKind.BAD_REQUEST,
                f"max_length {session_open.max_length} exceeds this peer's limit of {self.limits.inference_max_length}",
            )
        if session_open.batch_size > self.limits.max_batch_size:
            raise _Refusal(
                ErrorKind.BAD_REQUEST,
                f"batch size {session_open.batch_size} exceeds this peer's limit of {self.limits.max_batch_size}",
            )

    def _check_hidden(self, hidden_states: torch.Tensor, span: BlockSlice, *, max_batch: int) -> None:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != span.hidden_size or 0 in hidden_states.shape:
            raise _Refusal(
                ErrorKind.BAD_REQUEST,
                f"hidden states must be [batch, seq, {span.hidden_size}], got {list(hidden_states.shape)}",
            )
        if not hidden_states.is_floating_point():
            raise _Refusal(ErrorKind.BAD_REQUEST, f"hidden states must be floating point, got {hidden_states.dtype}")
        if hidden_states.shape[0] > max_batch:
            raise _Refusal(ErrorKind.BAD_REQUEST, f"batch {hidden_states.shape[0]} exceeds the limit of {max_batch}")
        if hidden_states.shape[1] > self.limits.inference_max_length:
            raise _Refusal(
                ErrorKind.BAD_REQUEST,
                f"{hidden_states.shape[1]} tokens exceed this peer's limit of {self.limits.inference_max_length}",
            )

    @staticmethod
    def _expect_tensors(tensors: list[torch.Tensor], count: int) -> list[torch.Tensor]:
        if len(tensors) != count:
            raise _Refusal(ErrorKind.BAD_REQUEST, f"expected {count} tensor(s), got {len(tensors)}")
        return tensors

    @staticmethod
    def _classify(error: Exception, peer: str) -> ErrorReply:
        if isinstance(error, _Refusal):
            return error.reply
        if isinstance(error, CacheFullError):
            return ErrorReply(ErrorKind.CACHE_FULL, str(error))
        if isinstance(error, RequestRejected):
            return ErrorReply(ErrorKind.UNAVAILABLE, str(error))
        if isinstance(error, ProtocolError):
            return ErrorReply(ErrorKind.BAD_REQUEST, str(error))
        logger.exception("Request from %s failed", peer)
        return ErrorReply(ErrorKind.INTERNAL, f"{type(error).__name__}: {error}")
