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
answers) and the client sends the step itself. A session's pushes to the next span's peer go in order over one
stream, each acknowledged once taken. Steps are numbered, so one that arrives both ways is run once, and one pushed
ahead of its turn (an earlier push failed, and the client sends that step itself) waits for it. A step pushed
before the client's opening of its session was read here waits briefly for the opening (`SESSION_OPEN_WAIT_S`):
the two come over different streams, in either order. The answer to a forwarded step carries a digest of what it
ran on, which the client compares with what the pushing peer answered it (swarm/client/session.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm import messages
from swarm.compression import in_compute_dtype
from swarm.errors import ProtocolError
from swarm.logs import short_id
from swarm.message_stream import MessageStream
from swarm.protocol import MAX_UNARY_PAYLOAD_BYTES, RPC_PUSH, ErrorKind, ErrorReply, ForwardedStep, ForwardTarget
from swarm.swarm_key import SwarmKey, rpc_token

logger = logging.getLogger(__name__)

MAX_FORWARDED_WAITING = 16  # forwarded steps a session holds before it runs them (a pipelined prompt's chunks)
# how long a pushed step waits for its session to open here: the client opens it on a stream of its own, which can
# be read after the previous span's peer has already computed the session's first step and pushed it
SESSION_OPEN_WAIT_S = 0.25


class Inbox:
    """A session's forwarded steps not yet run, in the order they came. A read (`next`) is a future that the next
    step resolves itself: a session that waits for its client and for pushes at once needs no task per step."""

    def __init__(self) -> None:
        self._steps: collections.deque[runtime_pb2.ExpertRequest] = collections.deque()
        self._read: asyncio.Future[runtime_pb2.ExpertRequest] | None = None

    def qsize(self) -> int:
        return len(self._steps)

    def put(self, request: runtime_pb2.ExpertRequest) -> None:
        read, self._read = self._read, None
        if read is not None and not read.done():
            read.set_result(request)
        else:  # nobody reads, or the read was given up (cancelled): the step waits for the next one
            self._steps.append(request)

    def next(self) -> asyncio.Future[runtime_pb2.ExpertRequest]:
        """The next step, once it comes; cancelling the future gives the read up and loses nothing."""
        read: asyncio.Future[runtime_pb2.ExpertRequest] = asyncio.get_running_loop().create_future()
        if self._steps:
            read.set_result(self._steps.popleft())
        else:
            self._read = read
        return read


class ForwardedSteps:
    """The sessions of this peer that take forwarded steps, by their id, each with its steps not yet run."""

    def __init__(self) -> None:
        self._inboxes: dict[str, Inbox] = {}
        self._awaited: dict[str, list[asyncio.Future[None]]] = {}  # pushes waiting for a session to open, by its id

    def open(self, session: str) -> Inbox:
        if session in self._inboxes:
            raise ValueError("another open session has this session id")
        inbox = Inbox()
        self._inboxes[session] = inbox
        for waiting in self._awaited.pop(session, []):
            if not waiting.done():
                waiting.set_result(None)
        return inbox

    def close(self, session: str) -> None:
        self._inboxes.pop(session, None)

    async def take_once_open(
        self, request: runtime_pb2.ExpertRequest, wait: float = SESSION_OPEN_WAIT_S
    ) -> ErrorReply | None:
        """`take`, after waiting up to `wait` seconds for the step's session to open if it is not open yet."""
        step = _forwarded_step(request)
        if isinstance(step, ErrorReply) or step.session in self._inboxes:
            return self._take(step, request)
        opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._awaited.setdefault(step.session, []).append(opened)
        try:
            await asyncio.wait([opened], timeout=wait)
        finally:
            waiting = self._awaited.get(step.session, [])
            if opened in waiting:
                waiting.remove(opened)
                if not waiting:
                    del self._awaited[step.session]
        return self._take(step, request)

    def take(self, request: runtime_pb2.ExpertRequest) -> ErrorReply | None:
        """Queue a pushed step for its session; an error reply when it cannot be taken."""
        return self._take(_forwarded_step(request), request)

    def _take(self, step: ForwardedStep | ErrorReply, request: runtime_pb2.ExpertRequest) -> ErrorReply | None:
        if isinstance(step, ErrorReply):
            return step
        inbox = self._inboxes.get(step.session)
        if inbox is None:
            return ErrorReply(ErrorKind.BAD_REQUEST, "no open session takes forwarded steps under this id")
        if inbox.qsize() >= MAX_FORWARDED_WAITING:
            return ErrorReply(ErrorKind.UNAVAILABLE, "the session has too many forwarded steps waiting")
        inbox.put(request)
        return None


def _forwarded_step(request: runtime_pb2.ExpertRequest) -> ForwardedStep | ErrorReply:
    try:
        return ForwardedStep.from_wire(messages.unpack_metadata(request.metadata))
    except Exception as e:
        return ErrorReply(ErrorKind.BAD_REQUEST, f"invalid forwarded step: {e}")


@dataclass(frozen=True, slots=True)
class IncomingStep:
    request: runtime_pb2.ExpertRequest
    forwarded: bool  # pushed by the previous span's peer, not sent by the client


@dataclass(frozen=True, slots=True)
class PushFailed:
    """The push of this session's step `step` to the next span's peer failed: the client is to be told."""

    step: int


class Pushes:
    """A session's pushes of its steps' outputs to the next span's peer. The peer answers the client at once and
    the push goes on in the background, over one stream to that peer's session for as long as the target stays
    the same (`_PushStream`). Failures go to `failed` (the step numbers), to be told to the client."""

    def __init__(self, p2p: P2P | None, swarm_key: SwarmKey | None, here: ForwardedSteps):
        self._p2p = p2p  # None: the handler serves no peer-to-peer calls (unit tests), so nothing can be pushed
        self._swarm_key = swarm_key
        self._here = here  # this peer's own sessions, for a target on this same peer
        self._stream: _PushStream | None = None
        self.failed: asyncio.Queue[int] = asyncio.Queue()

    @property
    def unsettled(self) -> bool:
        """Whether a push may still fail, or a failure is yet to be told."""
        return not self.failed.empty() or (self._stream is not None and self._stream.unacknowledged)

    def start(
        self, step: int, targets: tuple[ForwardTarget, ...], position: int, outputs: torch.Tensor, compression: str
    ) -> bool:
        """Start pushing the output of the session's step `step` to `targets[0]`, which sends its own on to the
        rest, as the client would have sent it: decoded under the wire compression, narrowed to the target's dtype.
        False when it cannot go: a long prompt step, which the client sends in chunks."""
        if self._p2p is None or messages.payload_bytes([outputs]) > MAX_UNARY_PAYLOAD_BYTES:
            return False
        target, *rest = targets
        outputs = in_compute_dtype(messages.as_received(outputs, compression), target.dtype)
        metadata = ForwardedStep(target.session, position, target.step, tuple(rest)).to_wire()
        own_id = self._p2p.peer_id.to_base58()
        if target.peer_id == own_id:
            if self._here.take(messages.request([outputs], metadata, compression)) is not None:
                self.failed.put_nowait(step)
            return True
        stream = self._stream_to(target)
        if self._swarm_key is not None and stream.fresh:  # the stream's first message carries the token
            metadata["auth"] = rpc_token(self._swarm_key, own_id, target.peer_id)
        stream.send(step, messages.request([outputs], metadata, compression), target.timeout)
        return True

    def prepare(self, target: ForwardTarget) -> None:
        """Start opening the stream to `target` (if it is not open), so that it opens while the step computes: on
        a session's first step, opening it after would delay the first token."""
        if self._p2p is not None and target.peer_id != self._p2p.peer_id.to_base58():
            self._stream_to(target)

    def _stream_to(self, target: ForwardTarget) -> _PushStream:
        assert self._p2p is not None
        stream = self._stream
        if stream is None or stream.ended or not stream.goes_to(target):
            if stream is not None:
                stream.close()
            stream = self._stream = _PushStream(self._p2p, target, self.failed)
        return stream

    def close(self) -> None:
        """The session ended: its pushes are moot."""
        if self._stream is not None:
            self._stream.close()


class _PushStream:
    """Steps pushed to one session on another peer over one libp2p stream (RPC_PUSH), each acknowledged in turn
    once that peer took it (a call per step, which hivemind opens a stream through both daemons for, made the 58M
    benchmark model's forwarded decode 0.94x unforwarded on loopback; on one stream, 0.96x to 1.01x). A step
    not taken within its timeout, a refusal or a broken stream ends the stream and fails every step still
    unacknowledged; the next push opens a new one."""

    def __init__(self, p2p: P2P, target: ForwardTarget, failed: asyncio.Queue[int]):
        self._peer_id, self._session = target.peer_id, target.session
        self._failed = failed
        self._stream: MessageStream | None = None
        self._unsent: list[runtime_pb2.ExpertRequest] = []  # pushed while the stream opens: they go first
        self._waiting: collections.deque[tuple[int, asyncio.TimerHandle]] = collections.deque()  # in sending order
        self.fresh = True  # nothing sent on it yet
        self.ended = False
        self._reader = asyncio.ensure_future(self._read(p2p))

    def goes_to(self, target: ForwardTarget) -> bool:
        return (self._peer_id, self._session) == (target.peer_id, target.session)

    @property
    def unacknowledged(self) -> bool:
        return bool(self._waiting)

    def send(self, step: int, request: runtime_pb2.ExpertRequest, timeout: float) -> None:
        """Push a step: written now if the stream is open, else as soon as it opens. (A socket that stays full
        shows as steps not taken in time.)"""
        timer = asyncio.get_running_loop().call_later(timeout, self._not_taken_in_time, step)
        self._waiting.append((step, timer))
        if self._stream is None:
            self._unsent.append(request)
        else:
            self._stream.send(request)
        self.fresh = False

    def close(self) -> None:
        self._reader.cancel()  # its clean-up ends the stream

    def _not_taken_in_time(self, step: int) -> None:
        """A step's timer, which fires only while the step is unacknowledged: every step that leaves `_waiting` has
        its timer cancelled."""
        logger.debug("Peer %s did not take forwarded step %d in time", short_id(self._peer_id), step)
        self.close()

    async def _read(self, p2p: P2P) -> None:
        try:
            self._stream = await MessageStream.open(p2p, PeerID.from_base58(self._peer_id), RPC_PUSH)
            for request in self._unsent:
                self._stream.send(request)
            self._unsent.clear()
            while (reply := await self._stream.receive(runtime_pb2.ExpertResponse)) is not None:
                if not self._waiting:
                    raise ProtocolError("an acknowledgement of no forwarded step")
                step, timer = self._waiting.popleft()
                timer.cancel()
                error = messages.error_of(messages.unpack_metadata(reply.metadata)) if reply.metadata else None
                if error is not None:
                    logger.debug("Peer %s did not take a forwarded step: %s", short_id(self._peer_id), error.message)
                    self._failed.put_nowait(step)
                    return
        except Exception as e:  # unreachable, malformed
            logger.debug("Forwarding steps to %s failed: %s: %s", short_id(self._peer_id), type(e).__name__, e)
        finally:
            self.ended = True
            for step, timer in self._waiting:
                timer.cancel()
                self._failed.put_nowait(step)
            self._waiting.clear()
            if self._stream is not None:
                self._stream.end()
                self._stream.close()


class StepSource:
    """The next step of one session, from the client's stream or, if the session takes them, forwarded by the
    previous span's peer: whichever comes first. At most one read of the client's stream is pending at a time, so
    a client cannot queue steps faster than they run."""

    def __init__(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], pushes: Pushes):
        self._requests = requests
        self._pushes = pushes  # the session's own, whose failures are to be told to the client
        self._forwarded: Inbox | None = None
        self._from_client: asyncio.Future[runtime_pb2.ExpertRequest] | None = None
        self._early: dict[int, runtime_pb2.ExpertRequest] = {}  # forwarded steps ahead of their turn, by number

    def take_forwarded(self, forwarded: Inbox | None) -> None:
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
        from_peer = None if self._forwarded is None else self._forwarded.next()
        # no push can start while this waits: with none unsettled now, none can fail
        push_failure = asyncio.ensure_future(self._pushes.failed.get()) if self._pushes.unsettled else None
        waiting = {self._from_client} | {read for read in (from_peer, push_failure) if read is not None}
        try:
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for queue_read in (from_peer, push_failure):
                if queue_read is not None and not queue_read.done():
                    queue_read.cancel()  # a cancelled read leaves its item where it was
        if from_peer is not None and from_peer in done:
            if push_failure is not None and push_failure in done:
                self._pushes.failed.put_nowait(push_failure.result())  # reported next time
            return IncomingStep(from_peer.result(), forwarded=True)  # the client's read stays pending
        if push_failure is not None and push_failure in done:
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
