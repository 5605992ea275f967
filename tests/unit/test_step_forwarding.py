"""Steps forwarded from peer to peer (peer/forwarding.py), on the handler itself: a forwarded step is answered on
the client's stream, a step that arrives twice runs once, one that arrives early waits for its turn, a push that
comes before its session's opening waits for it, pushes that name no open session are refused, and a push that a
hung peer does not take fails in time.

The handler runs on a fake one-block runtime that adds 1 to the hidden states (tests/unit/fake_blocks.py), so each
run of a step shows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from types import SimpleNamespace
from typing import Any

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

from peer.forwarding import ForwardedSteps, Pushes
from peer.handler import BlockHandler, HandlerLimits
from peer.kv_cache import KVCacheBudget
from swarm import messages
from swarm.protocol import ErrorKind, ErrorReply, ForwardedStep, ForwardTarget, InferenceOpen, InferenceStep
from tests.unit.fake_blocks import HIDDEN, FakeRuntime

HERE = PeerID(b"peer")
CLIENT = PeerID(b"client")


def _handler() -> BlockHandler:
    limits = HandlerLimits(
        inference_max_length=64, max_batch_size=1, session_idle_timeout=10.0, max_sessions_per_client=4,
        max_requests_per_client=2, max_message_bytes=2**20,
    )  # fmt: skip
    handler = BlockHandler(FakeRuntime(offset=1.0), KVCacheBudget(10**6), limits, lambda: None)  # type: ignore[arg-type,return-value]
    handler._p2p = SimpleNamespace(peer_id=HERE)  # type: ignore[assignment]  # pushes to this peer stay local
    return handler


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout=10))


class _Session:
    """The client's side of one inference stream into the handler, with session id `session`."""

    def __init__(self, handler: BlockHandler, session: str):
        self.session = session
        self._requests: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self.replies = handler.rpc_inference(self._stream(), P2PContext("test", HERE, CLIENT))
        self._opened = False
        self.input_digest: bytes | None = None  # that of the last reply, to a forwarded step

    async def _stream(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def open_ahead(self, *tensors: torch.Tensor) -> None:
        metadata = {"open": InferenceOpen(0, 1, 64, 1, session=self.session).to_wire()}
        self._requests.put_nowait(messages.request(list(tensors), metadata))
        self._opened = True

    def send(self, value: float, step: int, forward_to: tuple[ForwardTarget, ...] = ()) -> None:
        metadata = InferenceStep(0, step, forward_to).to_wire()
        if not self._opened:
            metadata["open"] = InferenceOpen(0, 1, 64, 1, session=self.session).to_wire()
            self._opened = True
        self._requests.put_nowait(messages.request([torch.full((1, 1, HIDDEN), value)], metadata))

    async def reply(self) -> tuple[float, bool]:
        """The next reply's value and whether the step was forwarded."""
        reply = await anext(self.replies)
        metadata = messages.unpack_metadata(reply.metadata) if reply.metadata else {}
        assert messages.error_of(metadata) is None, metadata
        self.input_digest = metadata.get("input_digest")
        (outputs,) = messages.tensors_of(reply)
        return float(outputs[0, 0, 0]), metadata.get("forwarded") is True

    async def close(self) -> None:
        self._requests.put_nowait(None)
        assert [reply async for reply in self.replies] == []


def _pushed(handler: BlockHandler, *steps: tuple[str, float, int]) -> list[ErrorReply | None]:
    """Push (session, value, step number) steps over one stream; what each acknowledgement said, in order."""
    requests = [
        messages.request([torch.full((1, 1, HIDDEN), value)], ForwardedStep(session, 0, step).to_wire())
        for session, value, step in steps
    ]

    async def push() -> list[ErrorReply | None]:
        replies = handler.rpc_push(as_aiter(*requests), P2PContext("test", HERE, PeerID(b"previous-peer")))
        return [messages.error_of(messages.unpack_metadata(reply.metadata)) async for reply in replies]

    return _run(push())


def test_a_chain_of_sessions_forwards_each_step_and_answers_each_on_its_own_stream() -> None:
    async def run() -> None:
        handler = _handler()
        first, second, third = (_Session(handler, name) for name in ("s1", "s2", "s3"))
        for index, session in enumerate((first, second, third)):  # the prompt: sent by the client to each span
            session.send(10.0 * index, step=0)
            assert await session.reply() == (10.0 * index + 1, False)
        chain = (ForwardTarget(HERE.to_base58(), "s2", 1, 5.0), ForwardTarget(HERE.to_base58(), "s3", 1, 5.0))
        first.send(100.0, step=1, forward_to=chain)
        assert await first.reply() == (101.0, True)
        assert await second.reply() == (102.0, True)  # run on the first's output, sent on to the third
        assert second.input_digest == messages.tensor_digest(torch.full((1, 1, HIDDEN), 101.0))  # what it ran on
        assert await third.reply() == (103.0, False)
        assert third.input_digest == messages.tensor_digest(torch.full((1, 1, HIDDEN), 102.0))
        second.send(101.0, step=1)  # the same step from the client (told it was not forwarded): runs once
        second.send(500.0, step=2)
        assert await second.reply() == (501.0, False)
        assert second.input_digest is None  # sent by the client: nothing to compare
        for session in (first, second, third):
            await session.close()
        assert handler.sessions.held_by(CLIENT) == 0

    _run(run())


def test_a_forwarded_step_that_the_client_sent_first_is_dropped() -> None:
    async def run() -> None:
        handler = _handler()
        session = _Session(handler, "s")
        session.send(1.0, step=0)
        assert await session.reply() == (2.0, False)
        session.send(5.0, step=1)
        assert await session.reply() == (6.0, False)
        assert _taken(handler, "s", 5.0, step=1)  # the previous peer's push, late
        session.send(7.0, step=2)
        assert await session.reply() == (8.0, False)  # not 6.0 again: the late push ran nothing
        await session.close()

    _run(run())


def test_a_forwarded_step_ahead_of_the_session_waits_for_the_steps_the_client_sends_before_it() -> None:
    """Pipelined chunks: the pushes of chunks 1 and 2 failed, so the client sends them itself, but chunk 3's push
    came first."""

    async def run() -> None:
        handler = _handler()
        session = _Session(handler, "s")
        session.send(1.0, step=0)
        assert await session.reply() == (2.0, False)
        assert _taken(handler, "s", 30.0, step=3)
        session.send(10.0, step=1)
        assert await session.reply() == (11.0, False)
        session.send(20.0, step=2)
        assert await session.reply() == (21.0, False)
        assert await session.reply() == (31.0, False)  # the held push, in its turn
        assert session.input_digest == messages.tensor_digest(torch.full((1, 1, HIDDEN), 30.0))
        await session.close()

    _run(run())


def test_pushes_that_arrive_out_of_order_run_in_order() -> None:
    """A push stream that timed out may still deliver its last step after the next stream's first."""

    async def run() -> None:
        handler = _handler()
        session = _Session(handler, "s")
        session.send(1.0, step=0)
        assert await session.reply() == (2.0, False)
        assert _taken(handler, "s", 20.0, step=2)
        assert _taken(handler, "s", 10.0, step=1)
        assert await session.reply() == (11.0, False)
        assert await session.reply() == (21.0, False)
        await session.close()

    _run(run())


def _taken(handler: BlockHandler, session: str, value: float, step: int) -> bool:
    request = messages.request([torch.full((1, 1, HIDDEN), value)], ForwardedStep(session, 0, step).to_wire())
    return handler.forwarded.take(request) is None


def test_a_push_stream_acknowledges_each_step_taken_and_ends_at_a_refusal() -> None:
    handler = _handler()
    inbox = handler.forwarded.open("s")
    acknowledgements = _pushed(handler, ("s", 1.0, 1), ("s", 2.0, 2), ("unknown", 3.0, 3), ("s", 4.0, 4))
    assert acknowledgements[:2] == [None, None] and inbox.qsize() == 2
    (refused,) = acknowledgements[2:]  # nothing after the refusal: the pushing peer opens a new stream
    assert refused is not None and refused.kind is ErrorKind.BAD_REQUEST and "no open session" in refused.message


def test_a_push_that_comes_before_its_session_opens_waits_for_the_opening() -> None:
    """The client opens the session on a stream of its own, which the peer may read after the previous span's peer
    has pushed the session's first step: the push waits for the opening (up to SESSION_OPEN_WAIT_S), and is taken;
    one whose session does not open in that time is refused, and no waiter is left behind."""

    async def run() -> None:
        handler = _handler()
        pushed = messages.request([torch.full((1, 1, HIDDEN), 1.0)], ForwardedStep("late", 0, 0).to_wire())
        taking = asyncio.ensure_future(handler.forwarded.take_once_open(pushed, wait=5.0))
        await asyncio.sleep(0.05)
        assert not taking.done()  # waiting for the opening
        inbox = handler.forwarded.open("late")
        assert await taking is None and inbox.next().result() is pushed
        never = messages.request([torch.full((1, 1, HIDDEN), 1.0)], ForwardedStep("never", 0, 0).to_wire())
        refused = await handler.forwarded.take_once_open(never, wait=0.05)
        assert refused is not None and "no open session" in refused.message
        assert not handler.forwarded._awaited

    _run(run())


def test_pushes_to_no_open_session_are_refused_and_a_step_ahead_of_the_session_ends_it() -> None:
    handler = _handler()
    (refused,) = _pushed(handler, ("unknown", 1.0, 0))
    assert refused is not None and refused.kind is ErrorKind.BAD_REQUEST and "no open session" in refused.message

    async def run() -> None:
        session = _Session(handler, "s")
        session.send(1.0, step=0)
        assert await session.reply() == (2.0, False)
        session.send(1.0, step=5)
        error = messages.error_of(messages.unpack_metadata((await anext(session.replies)).metadata))
        assert error is not None and "step 5 came before step 1" in error.message
        await session.close()  # the peer reads the stream to its end after a refusal, then ends it
        assert handler.sessions.held_by(CLIENT) == 0
        assert not _taken(handler, "s", 1.0, step=1)  # the ended session takes no more pushes

    _run(run())


def test_two_open_sessions_cannot_share_an_id() -> None:
    async def run() -> None:
        handler = _handler()
        first, second = _Session(handler, "same"), _Session(handler, "same")
        first.send(1.0, step=0)
        assert await first.reply() == (2.0, False)
        second.send(1.0, step=0)
        error = messages.error_of(messages.unpack_metadata((await anext(second.replies)).metadata))
        assert error is not None and error.kind is ErrorKind.BAD_REQUEST and "session id" in error.message
        first.send(3.0, step=1)  # the first session keeps its id and its pushes
        assert await first.reply() == (4.0, False)
        await first.close()

    _run(run())


def test_a_session_opened_ahead_of_its_first_step_takes_that_step_forwarded() -> None:
    async def run() -> None:
        handler = _handler()
        opened, open_session = asyncio.Event(), handler.forwarded.open

        def noted_open(session: str) -> asyncio.Queue:
            inbox = open_session(session)
            opened.set()
            return inbox

        handler.forwarded.open = noted_open  # type: ignore[method-assign]
        first, second = _Session(handler, "s1"), _Session(handler, "s2")
        first.open_ahead()
        second.open_ahead()
        second_reply = asyncio.ensure_future(second.reply())  # the handler reads the opening, sets the session up
        await opened.wait()
        first.send(1.0, step=0, forward_to=(ForwardTarget(HERE.to_base58(), "s2", 0, 5.0),))
        assert await first.reply() == (2.0, True)
        assert await second_reply == (3.0, False)
        await first.close()
        await second.close()

        refused = _Session(handler, "s3")
        refused.open_ahead(torch.zeros(1, 1, HIDDEN))
        error = messages.error_of(messages.unpack_metadata((await anext(refused.replies)).metadata))
        assert error is not None and error.kind is ErrorKind.BAD_REQUEST and "has no tensors" in error.message
        assert handler.sessions.held_by(CLIENT) == 0

    _run(run())


def test_a_failed_push_is_told_to_the_client_after_the_answer() -> None:
    """The peer answers at once that the step is being forwarded; when the push then fails (here: no session takes
    it), it tells the client on the same stream, which sends the step itself."""

    async def run() -> None:
        handler = _handler()
        session = _Session(handler, "s")
        session.send(1.0, step=0, forward_to=(ForwardTarget(HERE.to_base58(), "nobody", 0, 5.0),))
        assert await session.reply() == (2.0, True)
        notice = messages.unpack_metadata((await anext(session.replies)).metadata)
        assert notice == {"push_failed": 0}
        session.send(3.0, step=1)  # the session goes on
        assert await session.reply() == (4.0, False)
        await session.close()

    _run(run())


class _SilentPeer:
    """A P2P whose push streams to other peers are taken but never acknowledged (a hung peer): counts the streams
    opened and the steps sent on them."""

    peer_id = HERE

    def __init__(self) -> None:
        self.streams = 0
        self.sent: list[int] = []

    async def call_binary_stream_handler(
        self, peer_id: PeerID, name: str
    ) -> tuple[None, asyncio.StreamReader, _RecordingWriter]:
        self.streams += 1
        return None, asyncio.StreamReader(), _RecordingWriter(self.sent)  # a reader that never gets a byte


class _RecordingWriter:
    """The writing end of a push stream: records the target step number of each message written to it."""

    def __init__(self, sent: list[int]):
        self.sent = sent
        self.closed = False

    def write(self, frame: bytes) -> None:  # hivemind's framing: a marker byte, an 8-byte length, the message
        if frame[:1] == P2P.MESSAGE_MARKER:
            request = runtime_pb2.ExpertRequest.FromString(frame[1 + P2P.HEADER_LEN :])
            self.sent.append(ForwardedStep.from_wire(messages.unpack_metadata(request.metadata)).step)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def drain(self) -> None:
        pass


def test_a_push_not_taken_in_time_fails_and_the_next_push_opens_a_new_stream() -> None:
    async def run() -> None:
        peer = _SilentPeer()
        pushes = Pushes(peer, None, ForwardedSteps())  # type: ignore[arg-type]
        other = PeerID(b"next-peer").to_base58()
        outputs = torch.zeros(1, 1, HIDDEN)
        assert pushes.start(0, (ForwardTarget(other, "s", 1, 0.05),), 0, outputs, "none")
        assert pushes.unsettled
        assert await asyncio.wait_for(pushes.failed.get(), 5) == 0  # after its 0.05 s
        assert pushes.start(1, (ForwardTarget(other, "s", 2, 5.0),), 1, outputs, "none")
        await asyncio.sleep(0.01)
        assert (peer.streams, peer.sent) == (2, [1, 2])  # target step numbers, each on its own stream
        pushes.close()
        assert await asyncio.wait_for(pushes.failed.get(), 5) == 1  # the session ended: moot, but not lost
        assert not pushes.unsettled

    _run(run())


def test_the_emulated_delay_between_peers_holds_each_push_back_without_adding_up() -> None:
    """Benchmarks only (`--peer-latency-ms`): 5 steps pushed back to back each arrive half the round trip late, as
    on a network, not one after another's delay."""
    handler = _handler()
    handler.added_peer_latency = 0.8  # seconds: each push arrives 0.4 s late
    inbox = handler.forwarded.open("s")
    began = time.monotonic()
    assert _pushed(handler, *(("s", float(step), step) for step in range(1, 6))) == [None] * 5
    elapsed = time.monotonic() - began
    assert inbox.qsize() == 5
    assert 0.4 <= elapsed < 1.2, elapsed  # one after another: 2 s
