"""Calls to one peer over hivemind P2P, with every foreign error translated once into blockswarm's tree.

`map_p2p_errors` turns hivemind's daemon and handler errors, broken connections and timeouts into `PeerError`s
(ban the peer, route around it); an `ErrorReply` from the peer becomes the matching error (`CacheFullError`,
`RequestRejected` or `PeerProtocolError`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from swarm import messages
from swarm.errors import (
    CacheFullError,
    InvalidRequest,
    PeerError,
    PeerLeaving,
    PeerProtocolError,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    RequestRejected,
)
from swarm.logs import short_id
from swarm.protocol import (
    MAX_UNARY_PAYLOAD_BYTES,
    RPC_BACKWARD,
    RPC_BACKWARD_STREAM,
    RPC_FORWARD,
    RPC_FORWARD_STREAM,
    RPC_INFERENCE,
    RPC_INFO,
    ErrorKind,
    ErrorReply,
    ForwardTarget,
    InferenceOpen,
    InferenceStep,
    LoraHeader,
    PeerInfo,
    SpanRequest,
)


@dataclass(frozen=True)
class SpanAdapters:
    """What a stateless call carries besides hidden states: the client's trainable additions for the span."""

    lora: tuple[LoraHeader, list[torch.Tensor]] | None = None  # layout in swarm/models/lora.py
    prompts: torch.Tensor | None = None  # deep-ptune: [blocks of the span, pre_seq_len, hidden]

    def metadata(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        if self.lora is not None:
            metadata["lora"] = self.lora[0].to_wire()
        if self.prompts is not None:
            metadata["deep_prompts"] = True
        return metadata

    def tensors(self) -> list[torch.Tensor]:
        """[*lora, prompts], each detached: the peer returns their gradients in this order."""
        tensors = [] if self.lora is None else [t.detach() for t in self.lora[1]]
        return tensors if self.prompts is None else [*tensors, self.prompts.detach()]


@contextlib.contextmanager
def map_p2p_errors(peer_id: str) -> Iterator[None]:
    try:
        yield
    except (PeerError, RequestRejected):
        raise
    except (TimeoutError, asyncio.TimeoutError) as e:
        raise PeerTimeout(peer_id, "did not answer in time") from e
    except ProtocolError as e:
        raise PeerProtocolError(peer_id, str(e)) from e
    except P2PHandlerError as e:
        raise PeerProtocolError(peer_id, f"handler failed: {e}") from e
    except (P2PDaemonError, ConnectionError, EOFError, asyncio.IncompleteReadError, StopAsyncIteration) as e:
        raise PeerUnreachable(peer_id, f"connection failed: {type(e).__name__}: {e}") from e


def raise_for_error(peer_id: str, reply: ErrorReply | None) -> None:
    if reply is None:
        return
    if reply.kind is ErrorKind.CACHE_FULL:
        raise CacheFullError(f"peer {short_id(peer_id)}: {reply.message}", peer_id)
    if reply.kind is ErrorKind.UNAVAILABLE:
        raise PeerLeaving(f"peer {short_id(peer_id)}: {reply.message}", peer_id)
    if reply.kind in (ErrorKind.BAD_REQUEST, ErrorKind.UNAUTHORIZED):
        raise InvalidRequest(f"peer {short_id(peer_id)} refused the request: {reply.message}", peer_id)
    raise PeerProtocolError(peer_id, f"failed: {reply.message}")


async def call_info(p2p: P2P, peer_id: str, timeout: float) -> PeerInfo:
    with map_p2p_errors(peer_id):
        reply = await asyncio.wait_for(
            p2p.call_protobuf_handler(
                PeerID.from_base58(peer_id), RPC_INFO, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
            ),
            timeout,
        )
        metadata = messages.unpack_metadata(reply.metadata)
        raise_for_error(peer_id, messages.error_of(metadata))
        return PeerInfo.from_wire(metadata)


async def call_forward(
    p2p: P2P,
    peer_id: str,
    span: SpanRequest,
    hidden: torch.Tensor,
    timeout: float,
    adapters: SpanAdapters | None = None,
) -> torch.Tensor:
    metadata, adapter = _adapter_parts(span, adapters)
    (outputs,) = await _call_span(
        p2p, peer_id, RPC_FORWARD, RPC_FORWARD_STREAM, metadata, [hidden, *adapter], timeout,
        compression=span.compression, activations=1, expected=1,
    )  # fmt: skip
    return outputs


async def call_backward(
    p2p: P2P,
    peer_id: str,
    span: SpanRequest,
    hidden: torch.Tensor,
    grad_outputs: torch.Tensor,
    timeout: float,
    adapters: SpanAdapters | None = None,
) -> list[torch.Tensor]:
    """[grad w.r.t. hidden, *grads w.r.t. `adapters.tensors()`]."""
    metadata, adapter = _adapter_parts(span, adapters)
    return await _call_span(
        p2p, peer_id, RPC_BACKWARD, RPC_BACKWARD_STREAM, metadata, [hidden, grad_outputs, *adapter], timeout,
        compression=span.compression, activations=2, expected=1 + len(adapter),
    )  # fmt: skip


def _adapter_parts(span: SpanRequest, adapters: SpanAdapters | None) -> tuple[dict, list[torch.Tensor]]:
    if adapters is None:
        return span.to_wire(), []
    return {**span.to_wire(), **adapters.metadata()}, adapters.tensors()


async def _call_span(
    p2p: P2P,
    peer_id: str,
    unary_name: str,
    stream_name: str,
    metadata: dict,
    tensors: list[torch.Tensor],
    timeout: float,
    *,
    compression: str,
    activations: int,
    expected: int,
) -> list[torch.Tensor]:
    """Unary when the payload fits hivemind's cap, a chunked stream otherwise. The first `activations` tensors
    travel under the wire `compression`."""
    with map_p2p_errors(peer_id):
        peer = PeerID.from_base58(peer_id)
        if messages.payload_bytes(tensors) <= MAX_UNARY_PAYLOAD_BYTES:
            message = messages.request(tensors, metadata, compression, activations)
            reply = await asyncio.wait_for(
                p2p.call_protobuf_handler(peer, unary_name, message, runtime_pb2.ExpertResponse), timeout
            )
            reply_metadata, outputs = messages.unpack_metadata(reply.metadata), messages.tensors_of(reply)
        else:
            chunks = messages.to_chunked_messages(
                runtime_pb2.ExpertRequest, tensors, metadata, compression, activations
            )

            async def exchange() -> tuple[dict, list[torch.Tensor]]:
                replies = await p2p.iterate_protobuf_handler(
                    peer, stream_name, _aiter(chunks), runtime_pb2.ExpertResponse
                )
                return await messages.read_chunked_messages(replies)

            reply_metadata, outputs = await asyncio.wait_for(exchange(), timeout)
        raise_for_error(peer_id, messages.error_of(reply_metadata))
        if len(outputs) != expected:
            raise ProtocolError(f"expected {expected} tensor(s) in the reply, got {len(outputs)}")
        return outputs


@dataclass(frozen=True)
class StepReply:
    outputs: torch.Tensor
    forwarded: bool  # the peer also sent the outputs on to the next span's peer, which took them
    input_digest: bytes | None = None  # of the hidden states a forwarded step ran on (`messages.tensor_digest`)


class InferenceStream:
    """One open inference session with one peer over blocks [start, end); the peer holds its KV cache.

    Its steps are numbered (`InferenceStep.step`), those the previous span's peer forwards to it included
    (peer/forwarding.py). A reader task takes the peer's messages as they come: its answers, in order, and its
    notes that a push of one of its steps to the next span's peer failed, which may come between them."""

    def __init__(self, p2p: P2P, peer_id: str, session_open: InferenceOpen, adapters: SpanAdapters | None = None):
        self.p2p = p2p
        self.peer_id = peer_id
        self.session_open = session_open
        self.adapters = adapters  # sent once, with the first step; the peer applies them to every step
        self._requests: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._replies: AsyncIterator[runtime_pb2.ExpertResponse] | None = None
        self._sent_open = False  # the first step carries the session's opening (and its adapters)
        self.steps = 0  # steps sent or forwarded to it so far: the next one's number
        self._reader: asyncio.Task | None = None
        # the peer's answers with their metadata, in order; an exception once the stream failed or ended
        self._answers: asyncio.Queue[tuple[runtime_pb2.ExpertResponse, dict[str, Any]] | BaseException] = (
            asyncio.Queue()
        )
        self._failed_pushes: set[int] = set()  # steps whose push to the next span's peer failed
        self._ended = False  # no more messages will come
        self._news = asyncio.Event()  # set on each failed push and at the end

    async def open(self, timeout: float) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Open the libp2p stream, once, before or with the first step (a session opens all its spans' streams
        at once, so that no step waits for a stream to open); the peer's replies."""
        if self._replies is not None:
            return self._replies
        with map_p2p_errors(self.peer_id):
            self._replies = await asyncio.wait_for(
                self.p2p.iterate_protobuf_handler(
                    PeerID.from_base58(self.peer_id),
                    RPC_INFERENCE,
                    messages.queued(self._requests),
                    runtime_pb2.ExpertResponse,
                ),
                timeout,
            )
        self._reader = asyncio.ensure_future(self._read(self._replies))
        return self._replies

    async def _read(self, replies: AsyncIterator[runtime_pb2.ExpertResponse]) -> None:
        try:
            async for reply in replies:
                metadata = messages.unpack_metadata(reply.metadata)
                if "push_failed" in metadata:
                    self._failed_pushes.add(int(metadata["push_failed"]))
                    self._news.set()
                else:
                    self._answers.put_nowait((reply, metadata))
            self._answers.put_nowait(StopAsyncIteration())
        except Exception as e:
            self._answers.put_nowait(e)
        finally:
            self._ended = True
            self._news.set()

    async def push_failure(self, step: int) -> None:
        """Returns once the peer said that its push of its step `step` to the next span's peer failed, or its
        stream ended (a push may then never have been made)."""
        while step not in self._failed_pushes and not self._ended:
            self._news.clear()
            await self._news.wait()
        self._failed_pushes = {failed for failed in self._failed_pushes if failed > step}

    @property
    def takes_forwarded_steps(self) -> bool:
        """Whether the previous span's peer can forward steps to it: its session is open on the peer."""
        return self._sent_open and bool(self.session_open.session)

    def forward_target(self, timeout: float, dtype: str, step: int | None = None) -> ForwardTarget:
        """Where the previous span's peer sends a step (`step`: its number, the next one's by default), if it can
        within `timeout` seconds, narrowed to the peer's compute `dtype`."""
        step = self.steps if step is None else step
        return ForwardTarget(self.peer_id, self.session_open.session, step, timeout, dtype)

    def open_ahead(self) -> None:
        """Send the session's opening now, without a step: the peer sets the session up before the first step
        comes, which the previous span's peer can then forward to it. Not with adapters, which the peer checks
        against the first step's hidden states."""
        assert not self._sent_open and self.adapters is None
        self._requests.put_nowait(runtime_pb2.ExpertRequest(metadata=messages.pack_metadata(
            {"open": self.session_open.to_wire()}
        )))  # fmt: skip
        self._sent_open = True

    async def step(
        self, hidden: torch.Tensor, position: int, timeout: float, forward_to: tuple[ForwardTarget, ...] = ()
    ) -> StepReply:
        """Send hidden states that start at `position`; return the blocks' output. With `forward_to`, the peer
        also sends the output on to the next span's peer (which sends its own on to the rest)."""
        await self.send(hidden, position, timeout, forward_to)
        return await self.reply(hidden.shape[:2], timeout)

    async def send(
        self, hidden: torch.Tensor, position: int, timeout: float, forward_to: tuple[ForwardTarget, ...] = ()
    ) -> None:
        """Send a step without waiting for its answer (`reply`): a pipelined prompt's chunks go out back to back."""
        metadata = InferenceStep(position, self.steps, forward_to).to_wire()
        tensors = [hidden]
        if not self._sent_open:
            metadata["open"] = self.session_open.to_wire()
            if self.adapters is not None:
                metadata.update(self.adapters.metadata())
                tensors += self.adapters.tensors()
        with map_p2p_errors(self.peer_id):
            await self.open(timeout)
        self._requests.put_nowait(messages.request(tensors, metadata, self.session_open.compression))
        self._sent_open = True
        self.steps += 1

    async def forwarded_step(self, shape: torch.Size, timeout: float) -> StepReply:
        """The reply to the step of [batch, seq] `shape` that the previous span's peer forwarded to this one. Its
        number is counted once it came: cancelled before, the client can send the same step itself."""
        reply = await self.reply(shape, timeout)
        self.steps += 1
        return reply

    async def reply(self, shape: torch.Size, timeout: float) -> StepReply:
        """The answer to the oldest step not yet answered, of [batch, seq] `shape`."""
        with map_p2p_errors(self.peer_id):
            await self.open(timeout)
            answer = await asyncio.wait_for(self._answers.get(), timeout)
            if isinstance(answer, BaseException):
                self._answers.put_nowait(answer)  # and to every later read
                raise answer
            reply, metadata = answer
            raise_for_error(self.peer_id, messages.error_of(metadata))
            (outputs,) = messages.tensors_of(reply)
            if outputs.shape[:2] != shape:
                raise ProtocolError(f"reply of shape {list(outputs.shape)} for a step of shape {list(shape)}")
            return StepReply(outputs, metadata.get("forwarded") is True, metadata.get("input_digest"))

    async def abort(self) -> None:
        """Give up on the stream without waiting for the peer (used once it is known to have failed); closing the
        reply iterator closes hivemind's socket to the daemon."""
        self._requests.put_nowait(None)
        replies, self._replies = self._replies, None
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader], timeout=1.0)  # a read stuck in hivemind's clean-up is left behind
        if replies is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(replies.aclose(), timeout=1.0)

    async def close(self) -> None:
        """End the stream and wait briefly for the peer to end its side; the peer frees the session's cache."""
        self._requests.put_nowait(None)
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=5.0)
            if not self._reader.done():
                await self.abort()
        self._replies = None


async def _aiter(items: list[runtime_pb2.ExpertRequest]) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    for item in items:
        yield item
