"""Peers as the swarm sees them: replicas share sessions, a full cache is refused cleanly, SIGTERM leaves no trace."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from swarm import messages
from swarm.client._sync import run_sync
from swarm.client.transport import call_backward, call_forward
from swarm.errors import CacheFullError, RequestRejected
from swarm.models import ModelSource, load_block_slice
from swarm.process import descendants
from swarm.protocol import MAX_UNARY_PAYLOAD_BYTES, ServerState, SpanRequest
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE

pytestmark = pytest.mark.slow


def _prompt(length: int) -> torch.Tensor:
    return torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1, length), generator=torch.Generator().manual_seed(0))


def test_replicas_of_a_span_share_sessions(make_swarm, connect, tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama", 4)
    local_swarm = make_swarm(model_dir, [(0, 2), (2, 4), (2, 4)])
    distributed = connect(model_dir, local_swarm)
    second_span_peers = set()
    for _ in range(12):
        with distributed.inference_session(max_length=16) as session:
            distributed.generate(_prompt(4), max_new_tokens=2, do_sample=False)
            second_span_peers.add(session.route.spans[-1].peer_id)
        if len(second_span_peers) == 2:
            break
    assert len(second_span_peers) == 2


def test_full_cache_is_refused_clearly_and_peer_keeps_serving(make_swarm, connect, tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama", 4)
    local_swarm = make_swarm(model_dir, [(0, 4)], peer_args=["--cache-tokens", "100"])
    holder = connect(model_dir, local_swarm)
    other = connect(model_dir, local_swarm)

    with pytest.raises(CacheFullError, match="cache"):  # more than the peer could ever hold
        other.generate(_prompt(4), max_new_tokens=200, do_sample=False)

    with holder.inference_session(max_length=60):
        holder.generate(_prompt(4), max_new_tokens=4, do_sample=False)  # holds 60 of the peer's 100 tokens
        with pytest.raises(CacheFullError, match="cache"):
            other.generate(_prompt(4), max_new_tokens=56, do_sample=False)  # needs 60: the peer or the route refuses
        continued = holder.generate(_prompt(2), max_new_tokens=4, do_sample=False)  # the holder is unaffected
        assert continued.shape[1] == 4 + 4 + 2 + 4

    assert other.generate(_prompt(4), max_new_tokens=4, do_sample=False).shape[1] == 8  # freed: serving again


def test_sigterm_announces_offline_and_leaves_no_process(make_swarm, connect, tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama", 4)
    local_swarm = make_swarm(model_dir, [(0, 4), (0, 4)])
    distributed = connect(model_dir, local_swarm)
    leaving = local_swarm.peers[0]
    tree = descendants(leaving.pid)
    assert any(process.name == "p2pd" for process in tree)
    view = run_sync(distributed.swarm.wait_blocks_covered(timeout=30))
    assert len(view.spans) == 2

    leaving.send_signal(signal.SIGTERM)
    assert leaving.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while any(process.is_running() for process in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process.is_running() for process in tree), "a child of the peer (DHT process or p2pd) outlived it"

    states = {span.peer_id: span.info.state for span in run_sync(distributed.swarm.view(max_age=0)).spans}
    assert ServerState.OFFLINE in states.values()  # the leaver said goodbye; its record expires later
    assert ServerState.ONLINE in states.values()
    result = distributed.generate(_prompt(4), max_new_tokens=3, do_sample=False)  # routes around it
    assert result.shape[1] == 7


def test_bad_requests_get_clear_errors_and_the_peer_keeps_serving(make_swarm, connect, tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama", 4)
    local_swarm = make_swarm(model_dir, [(0, 4)], peer_args=["--inference-max-length", "64"])
    distributed = connect(model_dir, local_swarm)
    swarm = distributed.swarm
    peer_id = run_sync(swarm.wait_blocks_covered(timeout=30)).spans[0].peer_id
    p2p = run_sync(swarm.p2p())
    hidden = torch.zeros(1, 3, 64)

    def forward(span: SpanRequest, tensor: torch.Tensor) -> torch.Tensor:
        return run_sync(call_forward(p2p, peer_id, span, tensor, timeout=30))

    with pytest.raises(RequestRejected, match=r"hidden states must be \[batch, seq, 64\]"):
        forward(SpanRequest(0, 4), torch.zeros(1, 3, 7))
    with pytest.raises(RequestRejected, match="not served here; this peer hosts 0:4"):
        forward(SpanRequest(2, 9), hidden)
    with pytest.raises(RequestRejected, match="floating point"):
        forward(SpanRequest(0, 4), torch.zeros(1, 3, 64, dtype=torch.int64))
    with pytest.raises(RequestRejected, match="exceed this peer's limit of 64"):
        forward(SpanRequest(0, 4), torch.zeros(1, 65, 64))
    with pytest.raises(RequestRejected, match="max_length 100 exceeds"):
        distributed.generate(_prompt(4), max_new_tokens=96, do_sample=False)

    assert forward(SpanRequest(1, 3), hidden).shape == hidden.shape  # still serving, sub-spans too
    assert distributed.generate(_prompt(4), max_new_tokens=3, do_sample=False).shape[1] == 7


def test_payloads_above_the_unary_cap_are_streamed(make_swarm, connect, tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama", 4)
    local_swarm = make_swarm(model_dir, [(0, 4)])
    distributed = connect(model_dir, local_swarm)
    peer_id = run_sync(distributed.swarm.wait_blocks_covered(timeout=30)).spans[0].peer_id
    p2p = run_sync(distributed.swarm.p2p())
    hidden = torch.randn(8, 2100, 64, generator=torch.Generator().manual_seed(0))  # 4.3 MB, over the 4 MiB cap
    assert messages.payload_bytes([hidden]) > MAX_UNARY_PAYLOAD_BYTES
    span = SpanRequest(0, 4)
    outputs = run_sync(call_forward(p2p, peer_id, span, hidden, timeout=120))
    (grads,) = run_sync(call_backward(p2p, peer_id, span, hidden, torch.ones_like(hidden), timeout=120))

    blocks = load_block_slice(ModelSource.open(model_dir), 0, 4)
    inputs = hidden.clone().requires_grad_(True)
    expected = blocks(inputs)
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(outputs, expected.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(grads, inputs.grad, atol=1e-4, rtol=0)
