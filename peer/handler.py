"""The peer's RPC surface: decode -> validate -> runtime -> encode. No model math lives here.

Every bad request is answered with an `ErrorReply` to that caller only; the peer keeps serving everyone else.
Before anything is decoded, each remote peer is held to its share (`PerClientLimit`: open sessions, calls in
flight) and each message, and each chunked stream as a whole, to `max_message_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import achain, as_aiter
from prometheus_client import CollectorRegistry

from monitoring.peer_metrics import PeerMetrics
from peer.config import PeerConfig, default_max_message_bytes
from peer.forwarding import ForwardedSteps, Inbox, IncomingStep, Pushes, PushFailed, StepSource
from peer.kv_cache import KVCacheBudget
from peer.runtime import BlockRuntime, RequestAdapters
from swarm import messages
from swarm.asyncio_compat import asyncio_timeout
from swarm.errors import CacheFullError, ProtocolError, RequestRejected
from swarm.logs import short_id
from swarm.message_stream import serve_message_streams
from swarm.models import BlockSlice
from swarm.models.deep_prompts import check_prompts
from swarm.models.lora import check_lora
from swarm.protocol import (
    RPC_BACKWARD,
    RPC_BACKWARD_STREAM,
    RPC_FORWARD,
    RPC_FORWARD_STREAM,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PUSH,
    ErrorKind,
    ErrorReply,
    InferenceOpen,
    InferenceStep,
    LoraHeader,
    PeerInfo,
    SpanRequest,
)
from swarm.swarm_key import SwarmKey, check_rpc_token

logger = logging.getLogger(__name__)

DROP_REST_TIMEOUT = 30.0  # seconds a refused stream is read on; the client's request_timeout, after which it gave up


@dataclass(frozen=True, slots=True)
class HandlerLimits:
    inference_max_length: int  # tokens per sequence in one inference session
    max_batch_size: int
    session_idle_timeout: float  # seconds a session may wait for its next step
    max_sessions_per_client: int  # inference sessions one remote peer may hold open at once
    max_requests_per_client: int  # stateless forward/backward calls one remote peer may have in flight
    max_message_bytes: int  # largest request message, and largest chunked stream in total

    @classmethod
    def from_config(cls, config: PeerConfig, hidden_size: int) -> HandlerLimits:
        """The limits `config` sets; an unset --max-message-bytes is derived from the model's hidden size."""
        max_message_bytes = config.max_message_bytes
        if max_message_bytes is None:
            max_message_bytes = default_max_message_bytes(
                config.max_batch_size, config.inference_max_length, hidden_size
            )
        return cls(
            config.inference_max_length,
            config.max_batch_size,
            config.session_idle_timeout,
            config.max_sessions_per_client,
            config.max_requests_per_client,
            max_message_bytes,
        )


# (the call's span and compression, its whole metadata, its tensors) -> reply tensors, hidden states (or their
# gradients) first
_Message = TypeVar("_Message")
_SpanComputation = Callable[[SpanRequest, dict[str, Any], list[torch.Tensor]], Awaitable[list[torch.Tensor]]]


class _Refusal(Exception):
    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.reply = ErrorReply(kind, message)


class PerClientLimit:
    """How many of something (sessions, calls in flight) each remote peer holds here; one beyond `limit` is refused,
    so that a single client cannot take every slot of this peer while others wait.

    Only remote peers that hold something have an entry, so the map stays as small as what is open. One event loop
    owns it: no locking.
    """

    def __init__(self, limit: int, kind: ErrorKind, what: str, flag: str):
        if limit <= 0:
            raise ValueError(f"{flag} must be positive")
        self.limit = limit
        self._kind = kind  # chosen by how the client reacts to it (see BlockHandler.__init__)
        self._what = what
        self._flag = flag
        self._held: dict[PeerID, int] = {}

    @contextlib.contextmanager
    def hold(self, client: PeerID) -> Iterator[None]:
        """Count one for `client` while the block runs, however it ends; raise `_Refusal` if it has `limit` already."""
        held = self._held.get(client, 0)
        if held >= self.limit:
            raise _Refusal(
                self._kind,
                f"this client already has {held} {self._what} on this peer, the most it allows one client "
                f"({self._flag}); wait until one ends",
            )
        self._held[client] = held + 1
        try:
            yield
        finally:
            if self._held[client] == 1:
                del self._held[client]
            else:
                self._held[client] -= 1

    def held_by(self, client: PeerID) -> int:
        return self._held.get(client, 0)


class BlockHandler:
    """Serves the hosted blocks over hivemind P2P: info, inference sessions, forward and backward."""

    def __init__(
        self,
        runtime: BlockRuntime,
        budget: KVCacheBudget,
        limits: HandlerLimits,
        peer_info: Callable[[], PeerInfo],
        accepting_sessions: Callable[[], bool] = lambda: True,
        metrics: PeerMetrics | None = None,
        swarm_key: SwarmKey | None = None,
        added_latency: float = 0.0,
        added_peer_latency: float = 0.0,
        forward_noise: float = 0.0,
    ):
        self.runtime = runtime
        # benchmarks only, a network: a round trip with a client (each message of a session arrives half of it
        # late, each way), and one with another peer (a pushed step arrives half of it late)
        self.added_latency = added_latency
        self.added_peer_latency = added_peer_latency
        self.forward_noise = forward_noise  # tests only: a faulty peer forwards other outputs than it answers
        self.swarm_key = swarm_key  # a private swarm: every call must carry the caller's token
        self.budget = budget
        self.limits = limits
        # A session refused as UNAVAILABLE is skipped for that session only and the client tries other peers; a
        # stateless call refused so would make the client ban this peer, so it is refused as BAD_REQUEST instead,
        # which reaches the caller as is.
        self.sessions = PerClientLimit(
            limits.max_sessions_per_client, ErrorKind.UNAVAILABLE, "inference sessions open",
            "--max-sessions-per-client",
        )  # fmt: skip
        self.calls = PerClientLimit(
            limits.max_requests_per_client, ErrorKind.BAD_REQUEST, "forward/backward calls in flight",
            "--max-requests-per-client",
        )  # fmt: skip
        self._peer_info = peer_info
        self._accepting_sessions = accepting_sessions
        self.forwarded = ForwardedSteps()  # open sessions that take steps pushed by the previous span's peer
        self._p2p: P2P | None = None  # to push steps on to the next span's peer
        self.metrics = metrics or PeerMetrics(CollectorRegistry())  # unexported when the peer serves no metrics

    async def add_p2p_handlers(self, p2p: P2P) -> None:
        """Register every RPC, each wrapped so that its outcome, latency and bytes are recorded (`_measured`)."""
        self._p2p = p2p
        request_type = runtime_pb2.ExpertRequest
        for name, rpc, unary in [
            (RPC_INFO, "info", self.rpc_info),
            (RPC_FORWARD, "forward", self.rpc_forward),
            (RPC_BACKWARD, "backward", self.rpc_backward),
        ]:
            await p2p.add_protobuf_handler(name, self._measured(rpc, self._members_only(unary)), request_type)
        for name, rpc, stream in [
            (RPC_INFERENCE, "inference", self.rpc_inference),
            (RPC_FORWARD_STREAM, "forward", self.rpc_forward_stream),
            (RPC_BACKWARD_STREAM, "backward", self.rpc_backward_stream),
            (RPC_PUSH, "push", self.rpc_push),
        ]:
            measured = self._measured_stream(rpc, self._members_only_stream(stream))
            await serve_message_streams(p2p, name, measured, request_type)

    def _is_member(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> bool:
        assert self.swarm_key is not None
        try:
            metadata = messages.unpack_metadata(request.metadata) if request.metadata else {}
        except ProtocolError:
            return False
        caller, callee = context.remote_id.to_base58(), context.local_id.to_base58()
        return check_rpc_token(self.swarm_key, metadata, caller, callee)

    def _members_only(
        self,
        handler: Callable[[runtime_pb2.ExpertRequest, P2PContext], Awaitable[runtime_pb2.ExpertResponse]],
    ) -> Callable[[runtime_pb2.ExpertRequest, P2PContext], Awaitable[runtime_pb2.ExpertResponse]]:
        if self.swarm_key is None:
            return handler

        async def checked(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
            if not self._is_member(request, context):
                return messages.error_response(_NOT_A_MEMBER)
            return await handler(request, context)

        return checked

    def _members_only_stream(
        self,
        handler: Callable[
            [AsyncIterator[runtime_pb2.ExpertRequest], P2PContext], AsyncIterator[runtime_pb2.ExpertResponse]
        ],
    ) -> Callable[[AsyncIterator[runtime_pb2.ExpertRequest], P2PContext], AsyncIterator[runtime_pb2.ExpertResponse]]:
        """The first message of a stream carries the token; the rest of the stream is the same caller's."""
        if self.swarm_key is None:
            return handler

        async def checked(
            requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
        ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
            first = await anext(requests, None)
            if first is None:
                return
            if not self._is_member(first, context):
                yield messages.error_response(_NOT_A_MEMBER)
                await self._drop_rest(requests)
                return
            async for response in handler(achain(as_aiter(first), requests), context):
                yield response

        return checked

    def _measured(
        self,
        rpc: str,
        handler: Callable[[runtime_pb2.ExpertRequest, P2PContext], Awaitable[runtime_pb2.ExpertResponse]],
    ) -> Callable[[runtime_pb2.ExpertRequest, P2PContext], Awaitable[runtime_pb2.ExpertResponse]]:
        async def measured(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
            began, status, response = time.perf_counter(), "cancelled", None
            self.metrics.in_flight.labels(rpc).inc()
            try:
                response = await handler(request, context)
                status = _status_of(response)
                return response
            finally:
                self.metrics.in_flight.labels(rpc).dec()
                self.metrics.record_request(
                    rpc,
                    status,
                    time.perf_counter() - began,
                    request.ByteSize(),
                    response.ByteSize() if response is not None else 0,
                )

        return measured

    def _measured_stream(
        self,
        rpc: str,
        handler: Callable[
            [AsyncIterator[runtime_pb2.ExpertRequest], P2PContext], AsyncIterator[runtime_pb2.ExpertResponse]
        ],
    ) -> Callable[[AsyncIterator[runtime_pb2.ExpertRequest], P2PContext], AsyncIterator[runtime_pb2.ExpertResponse]]:
        async def measured(
            requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
        ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
            began, status, last_status, bytes_in, bytes_out = time.perf_counter(), "cancelled", "ok", 0, 0

            async def counted() -> AsyncIterator[runtime_pb2.ExpertRequest]:
                nonlocal bytes_in
                async for request in requests:
                    bytes_in += request.ByteSize()
                    yield request

            self.metrics.in_flight.labels(rpc).inc()
            try:
                async for response in handler(counted(), context):
                    bytes_out += response.ByteSize()
                    last_status = _status_of(response)  # an error reply is always a stream's last message
                    yield response
                status = last_status  # ended by the handler, not cancelled midway
            finally:
                self.metrics.in_flight.labels(rpc).dec()
                self.metrics.record_request(rpc, status, time.perf_counter() - began, bytes_in, bytes_out)

        return measured

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=messages.pack_metadata(self._peer_info().to_wire()))

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One session: reserve cache, then answer each step with the blocks' output, until the stream closes.
        Steps come from the client's stream and, when the session has an id, pushed by the previous span's peer
        (peer/forwarding.py); numbered steps run once and in order."""
        # benchmarks only: every message half a round trip late each way, as on a network
        delay = self.added_latency / 2
        replies = _delayed(self._session(_delayed(requests, delay), context), delay)
        async with contextlib.aclosing(replies):  # a stream broken off ends the session now, not once collected
            async for reply in replies:
                yield reply

    async def _session(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        peer = short_id(context.remote_id)
        pushes = Pushes(self._p2p, self.swarm_key, self.forwarded)
        steps = StepSource(requests, pushes)
        session_open: InferenceOpen | None = None
        next_step = 0  # the number of the session's next numbered step
        try:
            incoming = await self._next_step(steps, next_step)
            if incoming is None:
                return
            assert isinstance(incoming, IncomingStep)  # no push has started yet
            first = incoming.request
            metadata = messages.unpack_metadata(first.metadata)
            if "open" not in metadata:
                raise ProtocolError("the first message of an inference stream must carry 'open'")
            session_open = InferenceOpen.from_wire(metadata["open"])
            span = self._span(session_open.start, session_open.end)
            self._check_session(session_open)
            with self.sessions.hold(context.remote_id), self.budget.reserve(session_open.cache_tokens):
                steps.take_forwarded(self._forwarded_inbox(session_open))
                tensors = messages.tensors_of(first)
                opened_ahead = "position" not in metadata  # the opening alone, ahead of the first step
                adapters = None
                if opened_ahead:
                    if tensors:
                        raise _Refusal(ErrorKind.BAD_REQUEST, "an opening sent ahead of the first step has no tensors")
                else:
                    if not tensors:
                        raise _Refusal(ErrorKind.BAD_REQUEST, "expected the hidden states, got no tensor")
                    hidden_states, adapter = tensors[0], tensors[1:]
                    self._check_hidden(hidden_states, span, max_batch=session_open.batch_size)
                    adapters = self._adapters(metadata, span, hidden_states, adapter)
                    if adapters is not None:
                        adapters = adapters.on(span.device, span.dtype)  # once: every step of the session applies them
                logger.debug("Session from %s opened: blocks %d:%d", peer, session_open.start, session_open.end)
                cache = span.new_cache(session_open.max_length)
                if opened_ahead:
                    incoming = await self._next_step(steps, next_step)
                while incoming is not None:
                    if isinstance(incoming, PushFailed):  # the client sends that step itself
                        yield messages.response([], {"push_failed": incoming.step})
                        incoming = await self._next_step(steps, next_step)
                        continue
                    if incoming.request is not first:
                        metadata = messages.unpack_metadata(incoming.request.metadata)
                    step = InferenceStep.from_wire(metadata)
                    if 0 <= step.step < next_step:  # arrived both forwarded and from the client: ran already
                        incoming = await self._next_step(steps, next_step)
                        continue
                    if step.step > next_step:
                        if not incoming.forwarded:
                            raise ProtocolError(f"step {step.step} came before step {next_step}")
                        steps.hold_back(step.step, incoming.request)  # for its turn
                        incoming = await self._next_step(steps, next_step)
                        continue
                    if step.step >= 0:
                        next_step += 1
                    if incoming.request is not first:
                        (hidden_states,) = self._expect_tensors(messages.tensors_of(incoming.request), 1)
                    reply: dict[str, Any] = {}
                    if incoming.forwarded:  # the client checks that this is what the previous peer answered it
                        reply["input_digest"] = messages.tensor_digest(hidden_states)
                    cache = self._rewound(span, cache, step.position, session_open.max_length)
                    if step.forward_to:
                        pushes.prepare(step.forward_to[0])
                    outputs = await self._inference_step(span, cache, session_open, step, hidden_states, adapters)
                    if step.forward_to and self._send_on(step, session_open, outputs, pushes):
                        reply["forwarded"] = True  # written (or to be, once its stream opens): a failure is told later
                    yield messages.response([outputs], reply, session_open.compression)
                    incoming = await self._next_step(steps, next_step)
                logger.debug("Session from %s closed", peer)
        except _Refusal as e:
            yield messages.error_response(e.reply)
            await self._drop_rest(steps.rest())
        except Exception as e:
            yield messages.error_response(self._classify(e, peer))
            await self._drop_rest(steps.rest())
        finally:
            steps.close()
            pushes.close()
            if steps.takes_forwarded and session_open is not None:
                self.forwarded.close(session_open.session)

    def _forwarded_inbox(self, session_open: InferenceOpen) -> Inbox | None:
        """The session's queue of forwarded steps, registered under its id (None: it has no id, takes none)."""
        if not session_open.session:
            return None
        try:
            return self.forwarded.open(session_open.session)
        except ValueError as e:
            raise _Refusal(ErrorKind.BAD_REQUEST, str(e)) from None

    async def rpc_push(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Steps of one of this peer's sessions, sent on by the peer of the span before (peer/forwarding.py), each
        acknowledged once taken; a refusal ends the stream."""
        # benchmarks only: a step comes half a round trip between peers late; acknowledgements are on no step's path
        async with contextlib.aclosing(_delayed(requests, self.added_peer_latency / 2)) as arriving:
            async for request in arriving:
                try:
                    self._check_size(request.ByteSize(), "a forwarded step")
                    error = await self.forwarded.take_once_open(request)
                except _Refusal as e:
                    error = e.reply
                if error is not None:
                    yield messages.error_response(error)
                    await self._drop_rest(arriving)  # the pushing peer ends its side once refused
                    return
                yield runtime_pb2.ExpertResponse()

    def _send_on(self, step: InferenceStep, session_open: InferenceOpen, outputs: torch.Tensor, pushes: Pushes) -> bool:
        """Start pushing the step's output on to the next span's peer; False when it cannot go."""
        if self.forward_noise:
            outputs = outputs + torch.randn(outputs.shape) * self.forward_noise
        return pushes.start(step.step, step.forward_to, step.position, outputs, session_open.compression)

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._answer(request, context, self._forward)

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in self._answer_stream(requests, context, self._forward):
            yield message

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._answer(request, context, self._backward)

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in self._answer_stream(requests, context, self._backward):
            yield message

    async def _answer(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext, compute: _SpanComputation
    ) -> runtime_pb2.ExpertResponse:
        """A stateless call in one message each way."""
        try:
            with self.calls.hold(context.remote_id):
                self._check_size(request.ByteSize(), "the request")
                metadata, tensors = messages.unpack_metadata(request.metadata), messages.tensors_of(request)
                span_request = SpanRequest.from_wire(metadata)
                outputs = await compute(span_request, metadata, tensors)
                return messages.response(outputs, compression=span_request.compression)
        except Exception as e:
            return messages.error_response(self._classify(e, short_id(context.remote_id)))

    async def _answer_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext, compute: _SpanComputation
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A stateless call whose payload is too large for one message: chunks in, chunks out."""
        try:
            with self.calls.hold(context.remote_id):
                chunks = await self._read_chunks(requests)
                metadata, tensors = await messages.read_chunked_messages(as_aiter(*chunks))
                span_request = SpanRequest.from_wire(metadata)
                outputs = await compute(span_request, metadata, tensors)
        except Exception as e:
            yield messages.error_response(self._classify(e, short_id(context.remote_id)))
            await self._drop_rest(requests)
            return
        for message in messages.to_chunked_messages(
            runtime_pb2.ExpertResponse, outputs, compression=span_request.compression
        ):
            yield message

    @staticmethod
    def _rewound(span: BlockSlice, cache: Any, position: int, max_length: int) -> Any:
        """The session's cache without the tokens from `position` on, when a step starts before its end (rejected
        speculative tokens, an edited conversation); back to 0 is a fresh cache, whatever the layers are."""
        if position >= cache.get_seq_length():
            return cache
        if position == 0:
            return span.new_cache(max_length)
        try:
            span.rollback(cache, position)
        except ValueError as e:
            raise _Refusal(ErrorKind.BAD_REQUEST, str(e)) from None
        return cache

    async def _inference_step(
        self,
        span: BlockSlice,
        cache: Any,
        session_open: InferenceOpen,
        step: InferenceStep,
        hidden_states: torch.Tensor,
        adapters: RequestAdapters | None,
    ) -> torch.Tensor:
        self._check_hidden(hidden_states, span, max_batch=session_open.batch_size)
        if hidden_states.shape[0] != session_open.batch_size:
            raise _Refusal(
                ErrorKind.BAD_REQUEST, f"session batch is {session_open.batch_size}, step has {hidden_states.shape[0]}"
            )
        cached = cache.get_seq_length()
        if step.position > cached:
            raise _Refusal(
                ErrorKind.BAD_REQUEST, f"step starts at position {step.position}, the session holds {cached} tokens"
            )

        if step.position + hidden_states.shape[1] > session_open.max_length:
            raise _Refusal(
                ErrorKind.BAD_REQUEST,
                f"step would reach {step.position + hidden_states.shape[1]} tokens, "
                f"the session was opened for {session_open.max_length}",
            )
        began = time.perf_counter()
        outputs = await self.runtime.inference_step(span, cache, hidden_states, step.position, adapters)
        phase = "decode" if step.position > 0 and hidden_states.shape[1] == 1 else "prefill"
        self.metrics.record_step(phase, time.perf_counter() - began, hidden_states.shape[:2].numel())
        return outputs

    async def _forward(
        self, span_request: SpanRequest, metadata: dict[str, Any], tensors: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        span = self._span(span_request.start, span_request.end)
        if not tensors:
            raise _Refusal(ErrorKind.BAD_REQUEST, "expected the hidden states, got no tensor")
        hidden_states, adapter = tensors[0], tensors[1:]
        self._check_hidden(hidden_states, span, max_batch=self.limits.max_batch_size)
        adapters = self._adapters(metadata, span, hidden_states, adapter)
        outputs = await self.runtime.forward(span, hidden_states, adapters)
        self.metrics.record_tokens("forward", hidden_states.shape[:2].numel())
        return [outputs]

    async def _backward(
        self, span_request: SpanRequest, metadata: dict[str, Any], tensors: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        span = self._span(span_request.start, span_request.end)
        if len(tensors) < 2:
            raise _Refusal(
                ErrorKind.BAD_REQUEST, f"expected hidden states and their gradients, got {len(tensors)} tensor(s)"
            )
        hidden_states, grad_outputs, adapter = tensors[0], tensors[1], tensors[2:]
        self._check_hidden(hidden_states, span, max_batch=self.limits.max_batch_size)
        if grad_outputs.shape != hidden_states.shape:
            raise _Refusal(ErrorKind.BAD_REQUEST, "gradients must have the shape of the hidden states")
        adapters = self._adapters(metadata, span, hidden_states, adapter)
        grads = await self.runtime.backward(span, hidden_states, grad_outputs, adapters)
        self.metrics.record_tokens("backward", hidden_states.shape[:2].numel())
        return grads

    @staticmethod
    def _adapters(
        metadata: dict[str, Any], span: BlockSlice, hidden_states: torch.Tensor, tensors: list[torch.Tensor]
    ) -> RequestAdapters | None:
        """The caller's LoRA adapter and deep prompts for this span, checked against the hosted blocks."""
        deep_prompts = metadata.get("deep_prompts", False)
        if not isinstance(deep_prompts, bool):
            raise ProtocolError(f"deep_prompts must be a boolean, got {type(deep_prompts).__name__}")
        prompts = None
        if deep_prompts:
            if not tensors:
                raise ProtocolError("deep_prompts is set but the request carries no prompt tensor")
            *tensors, prompts = tensors
            check_prompts(span.blocks, prompts, hidden_states)
        lora = None
        if "lora" in metadata:
            header = LoraHeader.from_wire(metadata["lora"])
            check_lora(span.blocks, header, tensors, hidden_states.dtype)
            lora = (header, tensors)
        elif tensors:
            raise ProtocolError(f"{len(tensors)} extra tensor(s) without a 'lora' header")
        return None if lora is None and prompts is None else RequestAdapters(lora, prompts)

    async def _next_step(self, steps: StepSource, expected: int) -> IncomingStep | PushFailed | None:
        """The session's next message; `expected`: the number of its next numbered step."""
        try:
            incoming = await steps.next(self.limits.session_idle_timeout, expected)
        except TimeoutError:
            raise _Refusal(ErrorKind.BAD_REQUEST, "session idle for too long; closed") from None
        if isinstance(incoming, IncomingStep):
            self._check_size(incoming.request.ByteSize(), "an inference step")
        return incoming

    async def _read_chunks(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> list[runtime_pb2.ExpertRequest]:
        """Every message of a chunked stream, undecoded: the stream is refused as soon as it grows past
        `max_message_bytes`, so no tensor of an over-size stream is ever decoded, and what is held stays bounded."""
        chunks: list[runtime_pb2.ExpertRequest] = []
        total = 0
        async for request in requests:
            total += request.ByteSize()
            self._check_size(total, f"the chunked stream (after {len(chunks) + 1} message(s))")
            chunks.append(request)
        return chunks

    @staticmethod
    async def _drop_rest(requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
        """Read what the caller still sends after a refusal and drop it: a stream closed with unread data is reset,
        and the refusal sent just before can be lost with it. Gives up after `DROP_REST_TIMEOUT`, or when the
        stream breaks."""
        with contextlib.suppress(Exception):
            async with asyncio_timeout(DROP_REST_TIMEOUT):
                async for _ in requests:
                    pass

    def _check_size(self, size: int, what: str) -> None:
        """Refuse a message (or a stream so far) larger than any legitimate request, before it is decoded."""
        if size > self.limits.max_message_bytes:
            raise _Refusal(
                ErrorKind.BAD_REQUEST,
                f"{what} has {size} bytes, more than this peer's --max-message-bytes of "
                f"{self.limits.max_message_bytes}; send fewer rows or tokens per request",
            )

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


_NOT_A_MEMBER = ErrorReply(ErrorKind.UNAUTHORIZED, "this peer serves a private swarm; join it with its --swarm-key")


def _delayed(messages_in: AsyncIterator[_Message], seconds: float) -> AsyncIterator[_Message]:
    """Each message `seconds` after it came (benchmarks only, `_delay_line`); with no delay, the messages as they
    come."""
    return _delay_line(messages_in, seconds) if seconds else messages_in


async def _delay_line(messages_in: AsyncIterator[_Message], seconds: float) -> AsyncIterator[_Message]:
    """Each message `seconds` after it came, without holding up the ones behind it: a network's delay. A sleep per
    message where it is read or written would add the delays of a session's messages up (the chunks of a pipelined
    prompt, sent back to back, would arrive one delay apart)."""
    arrived: asyncio.Queue[tuple[float, _Message] | None] = asyncio.Queue()

    async def read() -> None:
        try:
            async for message in messages_in:
                arrived.put_nowait((time.monotonic() + seconds, message))
        finally:
            arrived.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (item := await arrived.get()) is not None:
            due, message = item
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            yield message
        await reader  # its error, if it failed
    finally:
        reader.cancel()  # which ends the source where the reader waits on it
        await asyncio.gather(reader, return_exceptions=True)


def _status_of(response: runtime_pb2.ExpertResponse) -> str:
    """ "ok", or the kind of the `ErrorReply` it carries (replies with tensors are never errors: skip the decode)."""
    if response.tensors or not response.metadata:
        return "ok"
    error = messages.error_of(messages.unpack_metadata(response.metadata))
    return "ok" if error is None else error.kind.value
