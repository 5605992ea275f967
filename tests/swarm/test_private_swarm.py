"""A private swarm in real processes: members with the key generate as usual, their peers forwarding steps to each
other with the swarm's token; a client without it (or with another key) cannot join the DHT, and its refused start
leaves no process or socket file behind; a process that dials a peer directly is refused by every RPC, a push stream
included."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM, messages
from swarm.cli import build_parser
from swarm.client._sync import run_sync
from swarm.client.metrics import client_metrics
from swarm.client.transport import call_forward, call_info
from swarm.dht import start_shared_memory_manager
from swarm.errors import ConfigError, InvalidRequest
from swarm.process import descendants, hivemind_socket_files, read_process
from swarm.protocol import RPC_PUSH, ErrorKind, ErrorReply, ForwardedStep, SpanRequest
from swarm.swarm_key import KeyedP2P, SwarmKey
from swarm.testing import LOOPBACK, LocalSwarm
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE

pytestmark = pytest.mark.slow

NUM_BLOCKS = 2
SPANS = [(0, 1), (1, NUM_BLOCKS)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:  # type: ignore[no-untyped-def]
    return tiny_model_dir("llama", NUM_BLOCKS)


@pytest.fixture(scope="module")
def swarm_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("private") / "swarm.key"
    args = build_parser().parse_args(["new-key", str(path)])
    assert args.run(args) == 0 and oct(path.stat().st_mode)[-3:] == "600"
    with pytest.raises(ConfigError, match="never overwritten"):
        args.run(args)
    return path


@pytest.fixture(scope="module")
def private_swarm(model_dir, swarm_key, make_swarm) -> LocalSwarm:  # type: ignore[no-untyped-def]
    return make_swarm(model_dir, SPANS, swarm_key=swarm_key)


def test_members_generate_as_in_an_open_swarm(model_dir, swarm_key, private_swarm, connect) -> None:  # type: ignore[no-untyped-def]
    model = connect(model_dir, private_swarm, swarm_key=str(swarm_key), verify_rate=0.0)
    forwarded = client_metrics().forwarded_steps._value.get()
    prompt = torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1, 5), generator=torch.Generator().manual_seed(0))
    expected = (
        AutoModelForCausalLM.from_pretrained(model_dir)
        .eval()
        .generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    )
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None), expected)
    assert client_metrics().forwarded_steps._value.get() == forwarded + 6  # every step, peer to peer, accepted


def test_outsiders_cannot_join_the_dht(model_dir, private_swarm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    start_shared_memory_manager()  # this process's one manager, which the first start of a DHT starts otherwise
    sockets_before, processes_before = hivemind_socket_files(), _our_processes_and_daemons()
    with pytest.raises(ConfigError, match="pass its --swarm-key"):
        AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=private_swarm.initial_peers)
    other_key = tmp_path / "other.key"
    SwarmKey.write_new(other_key)
    with pytest.raises(ConfigError, match="is --swarm-key this swarm's key"):
        AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=private_swarm.initial_peers, swarm_key=other_key
        )
    assert _our_processes_and_daemons() <= processes_before  # the refused clients' DHT processes and p2pd ended
    assert hivemind_socket_files() - sockets_before == set()  # and left no socket file


def _our_processes_and_daemons() -> set[tuple[int, int]]:
    """(pid, start time) of every running process of this test's tree, and of every running p2pd on the machine (a
    daemon whose parent ended lives on outside the tree)."""
    processes = descendants(os.getpid())
    processes += [
        info
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and (info := read_process(int(entry.name))) is not None and info.name == "p2pd"
    ]
    return {(info.pid, info.start_ticks) for info in processes if info.is_running()}


def test_a_peer_refuses_calls_without_the_swarms_token(private_swarm, swarm_key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    peer = private_swarm.peers[0]
    address = re.search(r"reachable at: --initial-peers (\S+)", peer.output()).group(1)
    peer_id = private_swarm.peer_id(peer)
    other_key = tmp_path / "other.key"
    SwarmKey.write_new(other_key)

    # an outsider that knows the peer's address: its p2pd dials it (the DHT handshake itself is refused)
    outsider = hivemind.DHT(
        initial_peers=[address], host_maddrs=[LOOPBACK], client_mode=True, ensure_bootstrap_success=False, start=True
    )
    try:
        p2p = run_sync(outsider.replicate_p2p())
        with pytest.raises(InvalidRequest, match="private swarm"):
            run_sync(call_info(p2p, peer_id, timeout=30))
        with pytest.raises(InvalidRequest, match="private swarm"):
            run_sync(call_forward(p2p, peer_id, SpanRequest(*SPANS[0]), torch.zeros(1, 2, 64), timeout=30))
        with pytest.raises(InvalidRequest, match="private swarm"):
            run_sync(call_info(KeyedP2P(p2p, SwarmKey.load(other_key)), peer_id, timeout=30))
        (refused,) = run_sync(asyncio.wait_for(_pushed_without_a_token(p2p, peer_id), 30))
        assert refused is not None and refused.kind is ErrorKind.UNAUTHORIZED
        info = run_sync(call_info(KeyedP2P(p2p, SwarmKey.load(swarm_key)), peer_id, timeout=30))
        assert (info.start, info.end) == SPANS[0]  # the same call with the token: answered
        run_sync(p2p.shutdown())
    finally:
        outsider.shutdown()


async def _pushed_without_a_token(p2p: P2P, peer_id: str) -> list[ErrorReply | None]:
    """What a peer answers a push stream whose first step carries no token."""
    step = messages.request([torch.zeros(1, 1, 64)], ForwardedStep("0" * 32, 0, 0).to_wire())
    replies = await p2p.iterate_protobuf_handler(
        PeerID.from_base58(peer_id), RPC_PUSH, as_aiter(step), runtime_pb2.ExpertResponse
    )
    return [messages.error_of(messages.unpack_metadata(reply.metadata)) async for reply in replies]
