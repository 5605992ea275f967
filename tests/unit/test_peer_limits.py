"""Per-client shares and message sizes on the peer: `PerClientLimit`, the derived --max-message-bytes, and the
handler refusing over-size messages before decoding them and freeing a client's session however it ends.

The handler runs here on a fake one-block runtime that echoes hidden states (tests/unit/fake_blocks.py), so no model
is loaded."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter
from hivemind.utils.streaming import split_for_streaming

from peer.config import MIN_DEFAULT_MESSAGE_BYTES, PeerConfig, default_max_message_bytes, parse_size
from peer.handler import BlockHandler, HandlerLimits, PerClientLimit, _Refusal
from peer.kv_cache import KVCacheBudget
from swarm import messages
from swarm.compression import serialize_tensor
from swarm.errors import ConfigError
from swarm.protocol import ErrorKind, ErrorReply, InferenceOpen, InferenceStep, SpanRequest
from tests.unit.fake_blocks import HIDDEN, FakeRuntime

LIMIT_BYTES = 4096
CLIENT_A, CLIENT_B = PeerID(b"client-a"), PeerID(b"client-b")


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout=10))


def test_per_client_limit_refuses_one_beyond_the_limit_and_frees_however_the_block_ends() -> None:
    limit = PerClientLimit(2, ErrorKind.UNAVAILABLE, "sessions open", "--max-sessions-per-client")
    with limit.hold(CLIENT_A), limit.hold(CLIENT_A):
        with pytest.raises(_Refusal, match=r"already has 2 sessions open .*\(--max-sessions-per-client\)") as refused:
            with limit.hold(CLIENT_A):
                pass
        assert refused.value.reply.kind is ErrorKind.UNAVAILABLE
        with limit.hold(CLIENT_B):  # another client is unaffected
            assert (limit.held_by(CLIENT_A), limit.held_by(CLIENT_B)) == (2, 1)
    with pytest.raises(RuntimeError), limit.hold(CLIENT_A):
        raise RuntimeError("the session failed")
    assert limit.held_by(CLIENT_A) == 0 and limit._held == {}  # no entry is kept for a client holding nothing


def test_default_max_message_bytes_is_twice_a_backward_call_at_the_limits() -> None:
    # hidden states + gradients of [8, 4096, 4096] in float32 = 1 GiB; twice that leaves room for adapters
    assert default_max_message_bytes(8, 4096, 4096) == 2 * 2**30
    assert default_max_message_bytes(1, 16, 64) == MIN_DEFAULT_MESSAGE_BYTES


def test_handler_limits_come_from_the_config() -> None:
    config = PeerConfig(model="m", new_swarm=True, max_sessions_per_client=3, max_requests_per_client=5)
    limits = HandlerLimits.from_config(config, hidden_size=4096)
    assert (limits.max_sessions_per_client, limits.max_requests_per_client) == (3, 5)
    assert limits.max_message_bytes == default_max_message_bytes(config.max_batch_size, 4096, 4096)
    explicit = PeerConfig(model="m", new_swarm=True, max_message_bytes=parse_size("1MiB", "--max-message-bytes"))
    assert HandlerLimits.from_config(explicit, hidden_size=4096).max_message_bytes == 2**20


@pytest.mark.parametrize(
    "field", ["max_sessions_per_client", "max_requests_per_client", "max_message_bytes"], ids=lambda f: f
)
def test_config_refuses_limits_that_are_not_positive(field: str) -> None:
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} must be positive"):
        PeerConfig(model="m", new_swarm=True, **{field: 0})


def test_parse_size_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--max-message-bytes must look like"):
        parse_size("lots", "--max-message-bytes")


def _handler(*, sessions: int = 2, idle_timeout: float = 10.0) -> BlockHandler:
    limits = HandlerLimits(
        inference_max_length=1024,
        max_batch_size=1,
        session_idle_timeout=idle_timeout,
        max_sessions_per_client=sessions,
        max_requests_per_client=2,
        max_message_bytes=LIMIT_BYTES,
    )
    return BlockHandler(FakeRuntime(), KVCacheBudget(10**6), limits, lambda: None)  # type: ignore[arg-type,return-value]


def _context(client: PeerID) -> P2PContext:
    return P2PContext(handle_name="test", local_id=PeerID(b"peer"), remote_id=client)


def _error(reply: runtime_pb2.ExpertResponse) -> ErrorReply | None:
    return messages.error_of(messages.unpack_metadata(reply.metadata))


def _hidden(tokens: int, width: int = HIDDEN) -> torch.Tensor:
    return torch.ones(1, tokens, width)  # 16 bytes a token


class _Session:
    """A client's side of one inference stream into the handler: steps go in through a queue."""

    def __init__(self, handler: BlockHandler, client: PeerID):
        self._requests: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self.replies = handler.rpc_inference(self._stream(), _context(client))

    async def _stream(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def step(self, tokens: int, *, first: bool = True, width: int = HIDDEN) -> ErrorReply | None:
        metadata: dict[str, Any] = InferenceStep(0).to_wire()  # the fake cache never grows: always position 0
        if first:
            metadata["open"] = InferenceOpen(0, 1, 1024, 1).to_wire()
        self._requests.put_nowait(messages.request([_hidden(tokens, width)], metadata))
        return _error(await anext(self.replies))

    async def close(self) -> None:
        self._requests.put_nowait(None)
        assert [reply async for reply in self.replies] == []


def test_a_client_over_its_session_share_is_refused_and_every_ending_frees_its_sessions() -> None:
    async def run() -> None:
        handler = _handler(sessions=2, idle_timeout=0.2)
        closed, cancelled = _Session(handler, CLIENT_A), _Session(handler, CLIENT_A)
        assert await closed.step(3) is None and await cancelled.step(3) is None
        refused = await _Session(handler, CLIENT_A).step(3)
        assert refused is not None and refused.kind is ErrorKind.UNAVAILABLE
        assert "--max-sessions-per-client" in refused.message
        other = _Session(handler, CLIENT_B)
        assert await other.step(3) is None  # another client is unaffected
        await other.close()

        await closed.close()  # the client ends its stream
        await cancelled.replies.aclose()  # the stream breaks off (hivemind cancels the handler)
        assert handler.sessions.held_by(CLIENT_A) == 0

        failed = _Session(handler, CLIENT_A)
        assert await failed.step(3) is None
        bad_step = await failed.step(3, first=False, width=HIDDEN + 1)  # a step the session refuses: it ends
        assert bad_step is not None and bad_step.kind is ErrorKind.BAD_REQUEST
        idle = _Session(handler, CLIENT_A)
        assert await idle.step(3) is None
        timed_out = await anext(idle.replies)  # no next step within the idle timeout
        assert (error := _error(timed_out)) is not None and "idle" in error.message
        await failed.close()
        assert handler.sessions.held_by(CLIENT_A) == 0

    _run(run())


def test_an_over_size_inference_step_is_refused_and_frees_the_session() -> None:
    async def run() -> None:
        handler = _handler()
        session = _Session(handler, CLIENT_A)
        error = await session.step(LIMIT_BYTES // 16)  # the tensor alone is the whole limit
        assert error is not None and error.kind is ErrorKind.BAD_REQUEST and "--max-message-bytes" in error.message
        assert handler.sessions.held_by(CLIENT_A) == 0
        midway = _Session(handler, CLIENT_A)
        assert await midway.step(3) is None
        error = await midway.step(LIMIT_BYTES // 16, first=False)
        assert error is not None and "an inference step has" in error.message
        assert handler.sessions.held_by(CLIENT_A) == 0

    _run(run())


def test_an_over_size_unary_request_is_refused_before_its_tensors_are_decoded() -> None:
    handler = _handler()
    undecodable = runtime_pb2.Tensor(buffer=b"x" * LIMIT_BYTES, size=[1], dtype="float32")
    request = runtime_pb2.ExpertRequest(metadata=messages.pack_metadata(SpanRequest(0, 1).to_wire()))
    request.tensors.append(undecodable)
    error = _error(_run(handler.rpc_forward(request, _context(CLIENT_A))))
    assert error is not None and error.kind is ErrorKind.BAD_REQUEST  # not "malformed tensor": never decoded
    assert (
        error.message.startswith(f"the request has {request.ByteSize()} bytes")
        and "--max-message-bytes" in error.message
    )
    valid = messages.request([_hidden(3)], SpanRequest(0, 1).to_wire())
    reply = _run(handler.rpc_forward(valid, _context(CLIENT_A)))
    assert _error(reply) is None and torch.equal(messages.tensors_of(reply)[0], _hidden(3))
    assert handler.calls.held_by(CLIENT_A) == 0


def test_a_chunked_stream_over_size_in_total_is_refused_though_each_chunk_fits() -> None:
    handler = _handler()
    parts = split_for_streaming(serialize_tensor(_hidden(2 * LIMIT_BYTES // 16)), LIMIT_BYTES // 4)
    chunks = [runtime_pb2.ExpertRequest(tensors=[part]) for part in parts]
    chunks[0].metadata = messages.pack_metadata(SpanRequest(0, 1).to_wire())
    assert max(chunk.ByteSize() for chunk in chunks) < LIMIT_BYTES < sum(chunk.ByteSize() for chunk in chunks)

    async def call(requests: list[runtime_pb2.ExpertRequest]) -> list[runtime_pb2.ExpertResponse]:
        return [reply async for reply in handler.rpc_forward_stream(as_aiter(*requests), _context(CLIENT_A))]

    (reply,) = _run(call(chunks))
    error = _error(reply)
    assert error is not None and error.kind is ErrorKind.BAD_REQUEST
    assert re.match(r"the chunked stream \(after [2-9] message\(s\)\) has \d+ bytes, more than", error.message)
    valid = messages.to_chunked_messages(runtime_pb2.ExpertRequest, [_hidden(3)], SpanRequest(0, 1).to_wire())
    metadata, outputs = _run(messages.read_chunked_messages(as_aiter(*_run(call(valid)))))
    assert messages.error_of(metadata) is None and torch.equal(outputs[0], _hidden(3))
