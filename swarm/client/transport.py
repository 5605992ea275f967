"""Calls to one peer over hivemind P2P, with every foreign error translated once into blockswarm's tree.

`map_p2p_errors` turns hivemind's daemon and handler errors, broken connections and timeouts into `PeerError`s
(ban the peer, route around it); an `ErrorReply` from the peer becomes the matching error (`CacheFullError`,
`RequestRejected` or `PeerProtocolError`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from swarm import messages
from swarm.asyncio_compat import asyncio_timeout
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
from swarm.message_stream import MessageStream
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


_Answer = tuple[runtime_pb2.ExpertResponse, dict[str, Any]]  # a peer's answer to a step, with its metadata


@dataclass(frozen=True)
class StepReply:
    outputs: torch.Tensor
    forwarded: bool  # the peer also sent the outputs on to the next span's peer, which took them
    input_digest: bytes | None = None  # of the hidden states a forwarded step ran on (`messages.tensor_digest`)


class InferenceStream:
    """One open inference session with one peer over blocks [start, end); the peer holds its KV cache.

    Its steps are numbered (`InferenceStep.step`), those the previous span's peer forwards to it included
    (peer/forwarding.py). A reader task takes the peer's messages as they come: its answers, in order, and its
    notes that a push of one of its steps to the next span's peer failed, which may come between them. A read of
    an answer or of a push's failure is a future that the reader task resolves itself: the token's answer reaches
    the step that waits for it with no task or queue between them."""

    def __init__(self, p2p: P2P, peer_id: str, session_open: InferenceOpen, adapters: SpanAdapters | None = None):
        self.p2p = p2p
        self.peer_id = peer_id
        self.session_open = session_open
        self.adapters = adapters  # sent once, with the first step; the peer applies them to every step
        self._stream: MessageStream | None = None
        self._unsent: list[runtime_pb2.ExpertRequest] = []  # sent before the stream opened: they go first
        self._sent_open = False  # the first step carries the session's opening (and its adapters)
        self.steps = 0  # steps sent or forwarded to it so far: the next one's number
        self._reader: asyncio.Task | None = None
        # the peer's answers that came before a read asked for them, in order; an exception once the stream failed
        # or ended, which stays for every later read
        self._answers: collections.deque[_Answer | BaseException] = collections.deque()
        self._reads: collections.deque[asyncio.Future[_Answer | BaseException]] = collections.deque()  # waiting
        self._failed_pushes: set[int] = set()  # steps whose push to the next span's peer failed, not yet asked for
        self._push_watches: list[tuple[int, asyncio.Future[None]]] = []  # (step, done once its push failed)
        self._ended = False  # no more messages will come

    async def open(self, timeout: float) -> None:
        """Open the libp2p stream, once, before or with the first step (a session opens all its spans' streams
        at once, so that no step waits for a stream to open)."""
        if self._stream is not None:
            return
        with map_p2p_errors(self.peer_id):
            stream = await asyncio.wait_for(
                MessageStream.open(self.p2p, PeerID.from_base58(self.peer_id), RPC_INFERENCE), timeout
            )
        self._stream = stream
        for request in self._unsent:
            stream.send(request)
        self._unsent.clear()
        self._reader = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: MessageStream) -> None:
        try:
            while (reply := await stream.receive(runtime_pb2.ExpertResponse)) is not None:
                metadata = messages.unpack_metadata(reply.metadata)
                if "push_failed" in metadata:
                    self._push_failed(int(metadata["push_failed"]))
                else:
                    self._deliver((reply, metadata))
            self._deliver(StopAsyncIteration())
        except Exception as e:
            self._deliver(e)
        finally:
            self._ended = True
            for _, watch in self._push_watches:  # a push may then never have been made
                if not watch.done():
                    watch.set_result(None)
            self._push_watches.clear()

    def _deliver(self, answer: _Answer | BaseException) -> None:
        """Hand an answer to the oldest read still waiting (a cancelled one takes nothing), or keep it for the next;
        an exception goes to every read, now and later."""
        while self._reads:
            read = self._reads.popleft()
            if not read.done():
                read.set_result(answer)
                if not isinstance(answer, BaseException):
                    return
        self._answers.append(answer)

    def _push_failed(self, step: int) -> None:
        waiting = [watch for watched, watch in self._push_watches if watched == step and not watch.done()]
        self._push_watches = [(watched, watch) for watched, watch in self._push_watches if watched != step]
        for watch in waiting:
            watch.set_result(None)
        if not waiting:
            self._failed_pushes.add(step)  # told before anyone asked

    def _write(self, request: runtime_pb2.ExpertRequest) -> None:
        if self._stream is None:
            self._unsent.append(request)
        else:
            self._stream.send(request)

    def next_answer(self) -> asyncio.Future[_Answer | BaseException]:
        """The peer's answer to the oldest step not yet answered, once it comes (`decoded` reads it). Cancelling the
        future gives up the read and leaves the answer to the next one."""
        read: asyncio.Future[_Answer | BaseException] = asyncio.get_running_loop().create_future()
        if self._answers:
            answer = self._answers[0]
            if not isinstance(answer, BaseException):
                self._answers.popleft()
            read.set_result(answer)
        else:
            self._reads.append(read)
        return read

    def push_failure(self, step: int) -> asyncio.Future[None]:
        """Done once the peer says that its push of its step `step` to the next span's peer failed, or its stream
        ended (a push may then never have been made)."""
        watch: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._failed_pushes = {failed for failed in self._failed_pushes if failed >= step}  # older ones are moot
        if step in self._failed_pushes or self._ended:
            self._failed_pushes.discard(step)
            watch.set_result(None)
        else:
            self._push_watches = [(watched, w) for watched, w in self._push_watches if not w.done()]
            self._push_watches.append((step, watch))
        return watch

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
        self._write(runtime_pb2.ExpertRequest(metadata=messages.pack_metadata({"open": self.session_open.to_wire()})))
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
            self._write(messages.request(tensors, metadata, self.session_open.compression))
            async with asyncio_timeout(timeout):  # waits only while the socket is full
                await self._stream.drain()
        self._sent_open = True
        self.steps += 1

    async def reply(self, shape: torch.Size, timeout: float) -> StepReply:
        """The answer to the oldest step not yet answered, of [batch, seq] `shape`."""
        with map_p2p_errors(self.peer_id):
            await self.open(timeout)
            async with asyncio_timeout(timeout):
                answer = await self.next_answer()
        return self.decoded(answer, shape)

    def decoded(self, answer: _Answer | BaseException, shape: torch.Size) -> StepReply:
        """A step's reply from the peer's answer (`next_answer`) to the step of [batch, seq] `shape`."""
        with map_p2p_errors(self.peer_id):
            if isinstance(answer, BaseException):
                raise answer
            reply, metadata = answer
            raise_for_error(self.peer_id, messages.error_of(metadata))
            (outputs,) = messages.tensors_of(reply)
            if outputs.shape[:2] != shape:
                raise ProtocolError(f"reply of shape {list(outputs.shape)} for a step of shape {list(shape)}")
            return StepReply(outputs, metadata.get("forwarded") is True, metadata.get("input_digest"))

    async def abort(self) -> None:
        """Give up on the stream without waiting for the peer (used once it is known to have failed): the
        connection to the daemon is dropped, which resets the stream."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader], timeout=1.0)

    async def close(self) -> None:
        """End the stream and wait briefly for the peer to end its side; the peer frees the session's cache."""
        if self._stream is not None:
            self._stream.end()
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=5.0)
            if not self._reader.done():
                await self.abort()
        if self._stream is not None:
            self._stream.close()
            self._stream = None


async def _aiter(items: list[runtime_pb2.ExpertRequest]) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    for item in items:
        yield item
