"""A live peer holds each client to its share of sessions and refuses over-size messages, and keeps serving.

One peer serves both blocks of a tiny llama with `--max-sessions-per-client 2 --max-message-bytes 1MiB`; clients
talk to it through the client transport and with raw RPCs (as tests/swarm/test_rpc_fuzzing.py does)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter
from hivemind.utils.streaming import split_for_streaming

from swarm import DistributedModelForCausalLM, messages
from swarm.client._sync import run_sync
from swarm.client.transport import InferenceStream, call_forward
from swarm.compression import serialize_tensor
from swarm.errors import InvalidRequest, RequestRejected
from swarm.protocol import RPC_FORWARD, RPC_FORWARD_STREAM, InferenceOpen, SpanRequest
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE

pytestmark = pytest.mark.slow

HIDDEN = 64  # the llama of tests/model_factory.py
LIMIT_BYTES = 2**20
OVER_LIMIT_TOKENS = 2 * LIMIT_BYTES // (HIDDEN * 4)  # float32 hidden states of twice the limit
TIMEOUT = 30.0


@dataclass
class Target:
    first: DistributedModelForCausalLM  # two clients: each has its own DHT node, so its own peer id
    second: DistributedModelForCausalLM
    peer_id: str

    @property
    def p2p(self) -> P2P:
        return run_sync(self.first.swarm.p2p())


@pytest.fixture(scope="module")
def target(make_swarm, connect, tiny_model_dir) -> Target:
    model_dir = tiny_model_dir("llama", 2)
    local_swarm = make_swarm(
        model_dir, [(0, 2)], peer_args=["--max-sessions-per-client", "2", "--max-message-bytes", "1MiB"]
    )
    first, second = connect(model_dir, local_swarm), connect(model_dir, local_swarm)
    return Target(first, second, local_swarm.peer_id(local_swarm.peers[0]))


def _hidden(tokens: int) -> torch.Tensor:
    return torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))


def _prompt() -> torch.Tensor:
    return torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1, 4), generator=torch.Generator().manual_seed(0))


def _open(target: Target) -> InferenceStream:
    """A session of the first client on the peer, opened by its first step."""
    stream = InferenceStream(target.p2p, target.peer_id, InferenceOpen(0, 2, max_length=16, batch_size=1))
    try:
        assert run_sync(stream.step(_hidden(3), 0, TIMEOUT)).outputs.shape == (1, 3, HIDDEN)
    except BaseException:
        run_sync(stream.abort())
        raise
    return stream


def _wait_until_opens(target: Target, timeout: float = TIMEOUT) -> InferenceStream:
    """Open a session once the peer has seen an aborted stream end (it learns that a moment after the client)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _open(target)
        except RequestRejected:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_sessions_beyond_the_per_client_limit_are_refused_and_freed_when_they_end(target: Target) -> None:
    held = [_open(target), _open(target)]
    with pytest.raises(RequestRejected, match=r"already has 2 inference sessions open .*--max-sessions-per-client"):
        _open(target)
    with pytest.raises(RequestRejected, match="--max-sessions-per-client"):  # through the session: skipped, ...
        target.first.generate(_prompt(), max_new_tokens=2, do_sample=False)
    assert target.peer_id not in target.first.swarm.banned()  # ... not banned: the client's other sessions go on

    assert target.second.generate(_prompt(), max_new_tokens=3, do_sample=False).shape == (1, 7)  # another client

    run_sync(held[0].close())  # the peer has freed the session once close() returns
    assert target.first.generate(_prompt(), max_new_tokens=3, do_sample=False).shape == (1, 7)
    run_sync(held[1].abort())
    again = [_open(target), _wait_until_opens(target)]
    for stream in again:
        run_sync(stream.close())


def test_over_size_messages_are_refused_and_the_peer_keeps_serving(target: Target) -> None:
    big = _hidden(OVER_LIMIT_TOKENS)
    with pytest.raises(InvalidRequest, match=r"the request has \d+ bytes, more than this peer's --max-message-bytes"):
        run_sync(call_forward(target.p2p, target.peer_id, SpanRequest(0, 2), big, TIMEOUT))  # unary: 2 MiB
    small = _hidden(3)
    assert run_sync(call_forward(target.p2p, target.peer_id, SpanRequest(0, 2), small, TIMEOUT)).shape == small.shape

    first_step = InferenceStream(target.p2p, target.peer_id, InferenceOpen(0, 2, max_length=16, batch_size=1))
    with pytest.raises(InvalidRequest, match=r"an inference step has \d+ bytes, more than"):
        run_sync(first_step.step(big, 0, TIMEOUT))
    run_sync(first_step.abort())
    later_step = _open(target)
    with pytest.raises(InvalidRequest, match=r"an inference step has \d+ bytes, more than"):
        run_sync(later_step.step(big, 3, TIMEOUT))
    run_sync(later_step.abort())
    run_sync(_open(target).close())  # neither refused session is still counted against the client

    parts = split_for_streaming(serialize_tensor(big), LIMIT_BYTES // 4)
    chunks = [runtime_pb2.ExpertRequest(tensors=[part]) for part in parts]  # each well under the limit
    chunks[0].metadata = messages.pack_metadata(SpanRequest(0, 2).to_wire())
    (reply,) = run_sync(_forward_stream(target.p2p, target.peer_id, chunks))
    error = messages.error_of(messages.unpack_metadata(reply.metadata))
    assert error is not None and error.message.startswith("the chunked stream (after")
    assert "--max-message-bytes" in error.message
    huge = _hidden(3 * OVER_LIMIT_TOKENS)  # 6 MiB: the client sends it as a chunked stream, in 2 MiB chunks
    with pytest.raises(InvalidRequest, match=r"the chunked stream \(after 1 message\(s\)\) has \d+ bytes"):
        run_sync(call_forward(target.p2p, target.peer_id, SpanRequest(0, 2), huge, TIMEOUT))
    valid = messages.to_chunked_messages(runtime_pb2.ExpertRequest, [small], SpanRequest(0, 2).to_wire())
    replies = run_sync(_forward_stream(target.p2p, target.peer_id, valid))
    metadata, outputs = run_sync(messages.read_chunked_messages(as_aiter(*replies)))
    assert messages.error_of(metadata) is None and outputs[0].shape == small.shape

    unary = messages.request([big], SpanRequest(0, 2).to_wire())  # raw, as a client that skips the transport
    reply = run_sync(target.p2p.call_protobuf_handler(PeerID.from_base58(target.peer_id), RPC_FORWARD, unary,
                                                       runtime_pb2.ExpertResponse))  # fmt: skip
    error = messages.error_of(messages.unpack_metadata(reply.metadata))
    assert error is not None and "--max-message-bytes" in error.message


async def _forward_stream(
    p2p: P2P, peer_id: str, chunks: list[runtime_pb2.ExpertRequest]
) -> list[runtime_pb2.ExpertResponse]:
    """The replies to a chunked forward stream, up to the first error (the peer closes the stream after one)."""
    replies: list[runtime_pb2.ExpertResponse] = []
    async with asyncio.timeout(TIMEOUT):
        stream = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer_id), RPC_FORWARD_STREAM, as_aiter(*chunks), runtime_pb2.ExpertResponse
        )
        try:
            async for reply in stream:
                replies.append(reply)
                if "error" in messages.unpack_metadata(reply.metadata):
                    break
        finally:
            await stream.aclose()
    return replies
