"""Steps that go from peer to peer: a peer sends a step's output straight on to the next span's peer.

Without forwarding, each step of a route of n spans takes 2n messages, every one to or from the client. With it,
the client sends to the first span only; each span's peer answers the client (who keeps every span's input for
replay and spot checks) and also pushes its output to the next span's peer (RPC_PUSH), which runs it as the
session's next step and answers on the client's own stream. A step then waits for n + 1 messages, not 2n: on
a real network the client's round trips are the long ones.

The client names the targets in the step (`InferenceStep.forward_to`), for each later span: its peer, the random id
of the session there, which the client tells no one else, the step's number in that session, and how long the push
may take (half the client's own timeout for the step, so that a failed push is told in time for the client to send
the step itself). Each peer sends its output on to the first target, with the rest, as the client would have sent it
(decoded under the wire compression, narrowed to the target's compute dtype). The pushing peer answers the client
with `{"forwarded": true}` as soon as the push is under way, without waiting for the target to take it: on a network
where peers are as far from each other as from the client, waiting would cost the client a round trip between peers
per span. If a push fails, the peer says so on the client's stream (a message `{"push_failed": step}`, between its
answers) and the client sends the step itself. Steps are numbered, so one that arrives both ways is run once, and
one pushed ahead of its turn (the pushes of a pipelined prompt's chunks run side by side) waits for it. The answer
to a forwarded step carries a digest of what it ran on, which the client compares with what the pushing peer
answered it (swarm/client/session.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm import messages
from swarm.compression import in_compute_dtype
from swarm.errors import ProtocolError
from swarm.logs import short_id
from swarm.protocol import MAX_UNARY_PAYLOAD_BYTES, RPC_PUSH, ErrorKind, ErrorReply, ForwardedStep, ForwardTarget
from swarm.swarm_key import SwarmKey, rpc_token

logger = logging.getLogger(__name__)

MAX_FORWARDED_WAITING = 16  # forwarded steps a session holds before it runs them (a pipelined prompt's chunks)


class ForwardedSteps:
    """The sessions of this peer that take forwarded steps, by their id, each with its steps not yet run."""

    def __init__(self) -> None:
        self._inboxes: dict[str, asyncio.Queue[runtime_pb2.ExpertRequest]] = {}

    def open(self, session: str) -> asyncio.Queue[runtime_pb2.ExpertRequest]:
        if session in self._inboxes:
            raise ValueError("another open session has this session id")
        inbox: asyncio.Queue[runtime_pb2.ExpertRequest] = asyncio.Queue()
        self._inboxes[session] = inbox
        return inbox

    def close(self, session: str) -> None:
        self._inboxes.pop(session, None)

    def take(self, request: runtime_pb2.ExpertRequest) -> ErrorReply | None:
        """Queue a pushed step for its session; an error reply when it cannot be taken."""
        try:
            step = ForwardedStep.from_wire(messages.unpack_metadata(request.metadata))
        except Exception as e:
            return ErrorReply(ErrorKind.BAD_REQUEST, f"invalid forwarded step: {e}")
        inbox = self._inboxes.get(step.session)
        if inbox is None:
            return ErrorReply(ErrorKind.BAD_REQUEST, "no open session takes forwarded steps under this id")
        if inbox.qsize() >= MAX_FORWARDED_WAITING:
            return ErrorReply(ErrorKind.UNAVAILABLE, "the session has too many forwarded steps waiting")
        inbox.put_nowait(request)
        return None


@dataclass(frozen=True, slots=True)
class IncomingStep:
    request: runtime_pb2.ExpertRequest
    forwarded: bool  # pushed by the previous span's peer, not sent by the client


@dataclass(frozen=True, slots=True)
class PushFailed:
    """The push of this session's step `step` to the next span's peer failed: the client is to be told."""

    step: int


class Pushes:
    """A session's pushes to the next span's peer, each in the background, so that the peer answers the client at
    once, side by side (the next peer runs a step pushed ahead of its turn in its turn). Failures go to `failed`
    (the step numbers)."""

    def __init__(self, failed: asyncio.Queue[int]):
        self._failed = failed
        self._running: set[asyncio.Task] = set()

    def start(self, step: int, push: Callable[[], Awaitable[bool]]) -> None:
        async def run() -> None:
            if not await push():
                self._failed.put_nowait(step)

        task = asyncio.ensure_future(run())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def cancel(self) -> None:
        """The session ended: its pushes are moot."""
        for task in self._running:
            task.cancel()


class StepSource:
    """The next step of one session, from the client's stream or, if the session takes them, forwarded by the
    previous span's peer: whichever comes first. At most one read of the client's stream is pending at a time, so
    a client cannot queue steps faster than they run."""

    def __init__(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]):
        self._requests = requests
        self._forwarded: asyncio.Queue[runtime_pb2.ExpertRequest] | None = None
        self._from_client: asyncio.Future[runtime_pb2.ExpertRequest] | None = None
        self._early: dict[int, runtime_pb2.ExpertRequest] = {}  # forwarded steps ahead of their turn, by number
        self.failed_pushes: asyncio.Queue[int] = asyncio.Queue()  # this session's (`Pushes`), to tell the client

    def take_forwarded(self, forwarded: asyncio.Queue[runtime_pb2.ExpertRequest] | None) -> None:
        """From now on, also the steps put in `forwarded` (the session's, once it is open; None: none)."""
        self._forwarded = forwarded

    @property
    def takes_forwarded(self) -> bool:
        return self._forwarded is not None

    def hold_back(self, number: int, request: runtime_pb2.ExpertRequest) -> None:
        """Keep a forwarded step that came ahead of its turn (an earlier push is still on its way, or failed and the
        client sends that step itself) until `next` is asked for its number."""
        if len(self._early) >= MAX_FORWARDED_WAITING:
            raise ProtocolError("too many steps forwarded ahead of their turn")
        self._early[number] = request

    async def next(self, timeout: float, expected: int) -> IncomingStep | PushFailed | None:
        """The next step, a step `expected` (its number) held back before coming first; or a failed push to
        report, or None once the client ended its stream. Raises TimeoutError after `timeout` seconds without any."""
        self._early = {number: request for number, request in self._early.items() if number >= expected}
        if (early := self._early.pop(expected, None)) is not None:
            return IncomingStep(early, forwarded=True)
        if self._from_client is None:
            self._from_client = asyncio.ensure_future(anext(self._requests))
        from_peer = None if self._forwarded is None else asyncio.ensure_future(self._forwarded.get())
        push_failure = asyncio.ensure_future(self.failed_pushes.get())
        waiting = {self._from_client, push_failure} | ({from_peer} if from_peer is not None else set())
        try:
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for queue_read in (from_peer, push_failure):
                if queue_read is not None and not queue_read.done():
                    queue_read.cancel()  # a cancelled Queue.get leaves its item in the queue
        if from_peer is not None and from_peer in done:
            if push_failure in done:
                self.failed_pushes.put_nowait(push_failure.result())  # reported next time
            return IncomingStep(from_peer.result(), forwarded=True)  # the client's read stays pending
        if push_failure in done:
            return PushFailed(push_failure.result())  # likewise
        if not done:
            raise TimeoutError
        from_client, self._from_client = self._from_client, None
        try:
            return IncomingStep(from_client.result(), forwarded=False)
        except StopAsyncIteration:
            return None

    async def rest(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        """What the client still sends, the read already pending first."""
        if self._from_client is not None:
            from_client, self._from_client = self._from_client, None
            try:
                yield await from_client
            except StopAsyncIteration:
                return
        async for request in self._requests:
            yield request

    def close(self) -> None:
        if self._from_client is not None and not self._from_client.done():
            self._from_client.cancel()


def push_of(
    p2p: P2P,
    swarm_key: SwarmKey | None,
    targets: tuple[ForwardTarget, ...],
    position: int,
    outputs: torch.Tensor,
    compression: str,
    here: ForwardedSteps,
) -> Callable[[], Awaitable[bool]] | None:
    """The push of a step's output to the next span's peer (`targets[0]`, which sends its own on to the rest), to
    await later: whether that peer took the step. None when it cannot go: a long prompt step, which the client
    sends in chunks. The message is made now, from the outputs as they are now."""
    if messages.payload_bytes([outputs]) > MAX_UNARY_PAYLOAD_BYTES:
        return None
    target, *rest = targets
    # what the client would send the next peer: the answer as it decodes it, narrowed to the next peer's dtype
    outputs = in_compute_dtype(messages.as_received(outputs, compression), target.dtype)
    metadata = ForwardedStep(target.session, position, target.step, tuple(rest)).to_wire()
    if target.peer_id == p2p.peer_id.to_base58():
        request = messages.request([outputs], metadata, compression)
        return lambda: _taken_here(here, request)
    if swarm_key is not None:
        metadata["auth"] = rpc_token(swarm_key, p2p.peer_id.to_base58(), target.peer_id)
    return functools.partial(_push, p2p, target, messages.request([outputs], metadata, compression))


async def _taken_here(here: ForwardedSteps, request: runtime_pb2.ExpertRequest) -> bool:
    return here.take(request) is None


async def _push(p2p: P2P, target: ForwardTarget, request: runtime_pb2.ExpertRequest) -> bool:
    """Never raises: on failure the client sends the step itself."""
    try:
        reply = await asyncio.wait_for(
            p2p.call_protobuf_handler(
                PeerID.from_base58(target.peer_id), RPC_PUSH, request, runtime_pb2.ExpertResponse
            ),
            target.timeout,
        )
        error = messages.error_of(messages.unpack_metadata(reply.metadata)) if reply.metadata else None
    except Exception as e:  # unreachable, timed out, malformed
        logger.debug("Forwarding a step to %s failed: %s: %s", short_id(target.peer_id), type(e).__name__, e)
        return False
    if error is not None:
        logger.debug("Peer %s did not take a forwarded step: %s", short_id(target.peer_id), error.message)
        return False
    return True
