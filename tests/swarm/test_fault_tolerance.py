"""Peers die, hang or leave mid-generation (real signals to real processes) and the text comes out the same."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM

from swarm.client import remote_blocks
from swarm.client.session import InferenceSession
from swarm.client.transport import InferenceStream
from swarm.errors import MissingBlocksError
from swarm.process import SwarmProcess
from swarm.protocol import ForwardTarget
from swarm.testing import LocalSwarm
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
OPTIONS = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
# spot checks off: a check's recomputation may be routed through a hung peer once its 1 s ban ends, and would wait
# for it as long as any stateless call does (request_timeout), which is not what these tests time
FAST_FAILURE = dict(min_step_timeout=1.0, ban_seconds=1.0, verify_rate=0.0)
PREFILL_CHUNK = 2  # the 6-token prompt flows down the route in 3 chunks


def _prompt(length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1, length), generator=torch.Generator().manual_seed(seed))


class FailDuringStep:
    """Signals the peer serving span `span_index` of a session's route right before step `at_step` reaches it
    (before the client sends it there or to a span whose peer forwards it there).

        The failure is real (the peer process is killed or stopped); this hook on the client only chooses the moment.
    """

    def __init__(self, local_swarm: LocalSwarm, *, at_step: int, span_index: int, signum: int = signal.SIGKILL):
        """SIGKILL and SIGSTOP hit the peer's whole process group (its DHT process and p2pd too), as when a
        machine dies or freezes; SIGTERM goes to the peer process alone, as a service manager sends it."""
        self.local_swarm = local_swarm
        self.at_step = at_step
        self.span_index = span_index
        self.signum = signum
        self.victim: SwarmProcess | None = None
        self.steps_seen = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FailDuringStep:
        original = InferenceSession._send

        async def send(session: InferenceSession, connection, hidden_states, position, forward_to=()):  # type: ignore[no-untyped-def]
            if self.victim is None and self._reaches(session, connection, forward_to):
                self.steps_seen += 1
                if self.steps_seen == self.at_step:
                    self.victim = self.local_swarm.process_of(session._connections[self.span_index].span.peer_id)
                    if self.signum == signal.SIGTERM:
                        self.victim.send_signal(self.signum)
                    else:
                        self.victim.signal_group(self.signum)
                    if self.signum == signal.SIGKILL:
                        self.victim.wait(timeout=30)
            return await original(session, connection, hidden_states, position, forward_to)

        monkeypatch.setattr(InferenceSession, "_send", send)
        return self

    def _reaches(self, session: InferenceSession, connection: object, forward_to: tuple[ForwardTarget, ...]) -> bool:
        """Whether a step sent through `connection` reaches the span: sent to it, or forwarded there."""
        target = session._connections[self.span_index]
        return connection is target or any(t.peer_id == target.span.peer_id for t in forward_to)


@pytest.fixture(scope="module")
def replicated(make_swarm, connect, tiny_model_dir) -> Iterator[tuple]:
    """Blocks 0:3 and 3:6 each served by two peers."""
    model_dir = tiny_model_dir("llama", 6)
    local_swarm = make_swarm(model_dir, [(0, 3), (0, 3), (3, 6), (3, 6)])
    distributed = connect(model_dir, local_swarm, **FAST_FAILURE)
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    yield local_swarm, distributed, local


def _restore(local_swarm: LocalSwarm, victim: SwarmProcess | None) -> None:
    """Start a fresh peer for the victim's blocks, so the next test has replicas again."""
    assert victim is not None, "the failure was never injected"
    start, end = (int(x) for x in victim.wait_for_line(r"Serving blocks (\d+):(\d+)", 5).groups())
    victim.kill()
    local_swarm.add_peer(start, end)


@pytest.mark.parametrize(
    ("at_step", "span_index"),
    [(1, 1), (20, 1), (NEW_TOKENS, 1), (20, 0)],
    ids=["prefill", "token-20", "last-token", "first-span-token-20"],
)
def test_reroutes_when_peer_dies_mid_generation(replicated, monkeypatch, at_step: int, span_index: int) -> None:
    local_swarm, distributed, local = replicated
    failure = FailDuringStep(local_swarm, at_step=at_step, span_index=span_index).install(monkeypatch)
    reroutes_before = REGISTRY.get_sample_value("blockswarm_client_reroutes_total") or 0.0
    with distributed.inference_session(max_length=80) as session:
        result = distributed.generate(_prompt(), **OPTIONS)
    assert failure.victim is not None and failure.victim.returncode is not None
    assert session.reroutes == 1
    assert REGISTRY.get_sample_value("blockswarm_client_reroutes_total") == reroutes_before + 1  # exported
    assert torch.equal(result, local.generate(_prompt(), **OPTIONS))
    monkeypatch.undo()
    _restore(local_swarm, failure.victim)


def test_reroutes_when_a_peer_dies_during_a_pipelined_prefill(replicated, monkeypatch) -> None:
    """The prompt's chunks go to the first span at once, to be forwarded to the second; its peer dies as the second
    chunk is sent. The whole route is replaced and the prompt sent again, span by span."""
    local_swarm, distributed, local = replicated
    victims: list[SwarmProcess] = []
    chunks_sent = 0
    original = InferenceStream.send

    async def send(stream: InferenceStream, hidden, position, timeout, forward_to=()):  # type: ignore[no-untyped-def]
        nonlocal chunks_sent
        if forward_to and hidden.shape[1] == PREFILL_CHUNK and not victims:
            chunks_sent += 1
            if chunks_sent == 2:
                victims.append(local_swarm.process_of(forward_to[0].peer_id))
                victims[0].signal_group(signal.SIGKILL)
                victims[0].wait(timeout=30)
        return await original(stream, hidden, position, timeout, forward_to)

    monkeypatch.setattr(InferenceStream, "send", send)
    with distributed.inference_session(max_length=80) as session:
        session.prefill_chunk_tokens = PREFILL_CHUNK
        result = distributed.generate(_prompt(), **OPTIONS)
    assert victims and victims[0].returncode is not None
    assert session.reroutes == 1
    assert torch.equal(result, local.generate(_prompt(), **OPTIONS))
    monkeypatch.undo()
    _restore(local_swarm, victims[0])


def test_hung_peer_is_detected_by_the_adaptive_timeout(replicated, monkeypatch) -> None:
    local_swarm, distributed, local = replicated
    failure = FailDuringStep(local_swarm, at_step=20, span_index=1, signum=signal.SIGSTOP).install(monkeypatch)
    try:
        with distributed.inference_session(max_length=80) as session:
            began = time.monotonic()
            result = distributed.generate(_prompt(seed=1), **OPTIONS)
            elapsed = time.monotonic() - began
        assert failure.victim is not None and failure.victim.returncode is None  # stopped, not dead
        assert session.reroutes == 1
        assert elapsed < distributed.swarm.config.request_timeout  # found well before the fixed timeout
        assert torch.equal(result, local.generate(_prompt(seed=1), **OPTIONS))
    finally:
        if failure.victim is not None:
            failure.victim.signal_group(signal.SIGCONT)
    monkeypatch.undo()
    _restore(local_swarm, failure.victim)


def test_forward_and_backward_retry_on_other_peers(replicated, monkeypatch) -> None:
    local_swarm, distributed, local = replicated
    victims: list[SwarmProcess] = []
    original = remote_blocks.call_backward

    async def call_backward(p2p, peer_id, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not victims:  # the first backward call: its peer dies just before the request reaches it
            victims.append(local_swarm.process_of(peer_id))
            victims[0].kill()
        return await original(p2p, peer_id, *args, **kwargs)

    monkeypatch.setattr(remote_blocks, "call_backward", call_backward)
    tokens = _prompt(length=9, seed=2)
    distributed.client_modules.requires_grad_(True)
    try:
        distributed.zero_grad()
        loss = distributed(tokens, labels=tokens).loss
        loss.backward()
    finally:
        distributed.client_modules.requires_grad_(False)
    local.zero_grad()
    expected = local(tokens, labels=tokens).loss
    expected.backward()
    assert victims and victims[0].returncode is not None
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        distributed.client_modules.embeddings.weight.grad, local.get_input_embeddings().weight.grad, atol=1e-4, rtol=0
    )
    monkeypatch.undo()
    _restore(local_swarm, victims[0])


def test_missing_blocks_raise_a_clear_error_in_bounded_time(make_swarm, connect, tiny_model_dir, monkeypatch) -> None:
    model_dir = tiny_model_dir("llama", 4)
    local_swarm = make_swarm(model_dir, [(0, 2), (2, 4)])
    distributed = connect(model_dir, local_swarm, **FAST_FAILURE, connect_timeout=3.0)
    FailDuringStep(local_swarm, at_step=5, span_index=1).install(monkeypatch)
    began = time.monotonic()
    with pytest.raises(MissingBlocksError, match="blocks 2:4") as error:
        distributed.generate(_prompt(), **OPTIONS)
    assert error.value.block_indices == [2, 3]
    assert time.monotonic() - began < distributed.swarm.config.connect_timeout + 15

    monkeypatch.undo()
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    options = {**OPTIONS, "max_new_tokens": 6, "min_new_tokens": 6}
    with distributed.inference_session(max_length=32):
        with pytest.raises(MissingBlocksError):  # the session cannot open yet ...
            distributed.generate(_prompt(), **options)
        local_swarm.add_peer(2, 4)
        result = distributed.generate(_prompt(), **options)  # ... and opens once the blocks are served
    assert torch.equal(result, local.generate(_prompt(), **options))


def test_restarted_peer_with_same_identity_is_used_after_its_ban(make_swarm, connect, tiny_model_dir, tmp_path) -> None:
    model_dir = tiny_model_dir("llama", 4)
    identity = tmp_path / "peer.id"
    local_swarm = make_swarm(model_dir, [])
    first = local_swarm.add_peer(0, 4, "--identity-path", str(identity))
    distributed = connect(model_dir, local_swarm, **FAST_FAILURE)
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    options = {**OPTIONS, "max_new_tokens": 8, "min_new_tokens": 8}
    assert torch.equal(distributed.generate(_prompt(), **options), local.generate(_prompt(), **options))
    peer_id = local_swarm.peer_id(first)
    first.kill()
    distributed.swarm.ban(peer_id, "killed by the test")  # as the client would after a failed step
    second = local_swarm.add_peer(0, 4, "--identity-path", str(identity))
    assert local_swarm.peer_id(second) == peer_id
    assert torch.equal(distributed.generate(_prompt(), **options), local.generate(_prompt(), **options))


def test_draining_peer_finishes_open_sessions(make_swarm, connect, tiny_model_dir, monkeypatch) -> None:
    model_dir = tiny_model_dir("llama", 4)
    local_swarm = make_swarm(model_dir, [(0, 2), (2, 4), (2, 4)], peer_args=["--drain-timeout", "60"])
    distributed = connect(model_dir, local_swarm, **FAST_FAILURE)
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    failure = FailDuringStep(local_swarm, at_step=10, span_index=1, signum=signal.SIGTERM)
    failure.install(monkeypatch)
    with distributed.inference_session(max_length=80) as session:
        result = distributed.generate(_prompt(), **OPTIONS)
        assert failure.victim is not None
        assert failure.victim.returncode is None  # still serving this session while draining
    assert session.reroutes == 0  # the session never noticed
    assert torch.equal(result, local.generate(_prompt(), **OPTIONS))
    assert failure.victim.wait(timeout=30) == 0  # left once its last session closed
    monkeypatch.undo()
    second = distributed.generate(_prompt(seed=3), **{**OPTIONS, "max_new_tokens": 4, "min_new_tokens": 4})
    assert second.shape[1] == 6 + 4  # new sessions go to the remaining replica


def test_peer_joining_later_is_used_by_new_sessions(make_swarm, connect, tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama", 4)
    local_swarm = make_swarm(model_dir, [(0, 4)])
    distributed = connect(model_dir, local_swarm, **FAST_FAILURE)
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    options = {**OPTIONS, "max_new_tokens": 8, "min_new_tokens": 8}
    first = local_swarm.peer_id(local_swarm.peers[0])
    with distributed.inference_session(max_length=32) as session:
        distributed.generate(_prompt(), **options)
        assert session.route.spans[0].peer_id == first

    newcomer = local_swarm.peer_id(local_swarm.add_peer(0, 4))
    local_swarm.peers[0].kill()  # only the newcomer is left
    with distributed.inference_session(max_length=32) as session:
        result = distributed.generate(_prompt(), **options)
        assert session.route.spans[0].peer_id == newcomer
    assert torch.equal(result, local.generate(_prompt(), **options))
