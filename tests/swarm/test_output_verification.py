"""Spot checks in a real swarm: a peer that returns slightly wrong hidden states (a test-only flag adds noise to
its outputs) is outvoted by two honest peers, banned and replaced within 2/p - 1 steps at verify rate p, and the
session's tokens still equal local generation."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM

from swarm import DistributedModelForCausalLM
from swarm.client._sync import run_sync
from swarm.client.metrics import client_metrics
from swarm.client.session import InferenceSession
from swarm.protocol import ServerState

pytestmark = pytest.mark.slow

VERIFY_RATE = 0.1
MAX_STEPS_TO_DETECT = round(2 / VERIFY_RATE) - 1  # the longest gap between two checks
NOISE_STD = 0.03  # 3x the check's tolerance on the demo model's outputs (|h| ~ 36), too small to change a token
NUM_BLOCKS = 6
GREEDY = dict(do_sample=False, eos_token_id=None)


def _verifications(outcome: str) -> float:
    return REGISTRY.get_sample_value("blockswarm_client_verifications_total", {"outcome": outcome}) or 0.0


def test_a_faulty_peer_is_outvoted_banned_and_replaced_without_changing_the_tokens(
    demo_model, make_swarm, connect
) -> None:  # type: ignore[no-untyped-def]
    local_swarm = make_swarm(demo_model, [])
    faulty = local_swarm.add_peer(0, NUM_BLOCKS, "--debug-output-noise", str(NOISE_STD))
    faulty_id = local_swarm.peer_id(faulty)
    model = connect(demo_model, local_swarm, verify_rate=VERIFY_RATE)
    prompt = torch.tensor([[1, 200, 300, 400, 500]])
    expected = AutoModelForCausalLM.from_pretrained(demo_model).eval().generate(prompt, max_new_tokens=32, **GREEDY)
    found_faulty = _verifications("peer_faulty")

    with model.inference_session(max_length=prompt.shape[1] + 32) as session:
        first = model.generate(prompt, max_new_tokens=1, **GREEDY)  # the only peer: the session opens on it
        assert [span.peer_id for span in session.route.spans] == [faulty_id]
        for _ in range(2):
            local_swarm.add_peer(0, NUM_BLOCKS, wait=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the client sees both honest peers online
            states = [span.info.state for span in run_sync(model.swarm.view(max_age=0)).spans]
            if states.count(ServerState.ONLINE) == 3:
                break
        else:
            pytest.fail("the honest peers did not come online")

        within = model.generate(max_new_tokens=MAX_STEPS_TO_DETECT, **GREEDY)
        assert _verifications("peer_faulty") == found_faulty + 1, "not caught within 2/p - 1 steps"
        assert faulty_id in model.swarm.banned() and session.reroutes == 1
        assert faulty_id not in [span.peer_id for span in session.route.spans]
        rest = model.generate(max_new_tokens=32 - 1 - MAX_STEPS_TO_DETECT, **GREEDY)

    assert torch.equal(first, expected[:, : prompt.shape[1] + 1])
    assert torch.equal(within, expected[:, : prompt.shape[1] + 1 + MAX_STEPS_TO_DETECT])
    assert torch.equal(rest, expected)


def test_training_calls_through_a_faulty_peer_are_caught_and_computed_elsewhere(
    demo_model, make_swarm, connect
) -> None:  # type: ignore[no-untyped-def]
    local_swarm = make_swarm(demo_model, [(0, NUM_BLOCKS), (0, NUM_BLOCKS)])
    faulty_id = local_swarm.peer_id(local_swarm.add_peer(0, NUM_BLOCKS, "--debug-output-noise", str(NOISE_STD)))
    model = connect(demo_model, local_swarm, verify_rate=1.0)  # every call checked
    run_sync(model.swarm.wait_blocks_covered(timeout=60))
    local = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    tokens = torch.tensor([[1, 200, 300, 400, 500, 600, 700]])
    caught = _verifications("peer_faulty") + _verifications("verifier_faulty")

    for _ in range(40):  # training calls spread over the replicas at random: until one lands on the faulty peer
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, local(tokens).logits, atol=1e-4, rtol=0)
        if faulty_id in model.swarm.banned():
            break
    else:
        pytest.fail("no forward call went to the faulty peer")
    # outvoted either as the peer a call went to or as the verifier of another peer's call
    assert _verifications("peer_faulty") + _verifications("verifier_faulty") == caught + 1

    agreed = _verifications("agreed")
    vectors = local.get_input_embeddings()(tokens).detach()
    ours, theirs = vectors.clone().requires_grad_(True), vectors.clone().requires_grad_(True)
    model(inputs_embeds=ours, labels=tokens).loss.backward()  # forward and backward both checked: they agree
    local(inputs_embeds=theirs, labels=tokens).loss.backward()
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=0)
    assert _verifications("agreed") >= agreed + 2


@contextlib.contextmanager
def _session_through_a_lying_forwarder(  # type: ignore[no-untyped-def]
    demo_model, make_swarm, connect, monkeypatch, prompt: torch.Tensor, max_length: int
) -> Iterator[tuple[DistributedModelForCausalLM, InferenceSession, str, torch.Tensor]]:
    """A session whose route starts at a peer that forwards other hidden states than it answers (a test-only flag
    adds noise to what it forwards, large enough to change the tokens), open after one token generated unforwarded
    (the faulty peer is then the only one of its blocks), with an honest peer of the same blocks online since: the
    model, the session, the faulty peer's id and the tokens so far."""
    local_swarm = make_swarm(demo_model, [(2, 4), (4, NUM_BLOCKS)])
    faulty_id = local_swarm.peer_id(local_swarm.add_peer(0, 2, "--debug-forward-noise", "1.0"))
    model = connect(demo_model, local_swarm, verify_rate=0.0)
    run_sync(model.swarm.wait_blocks_covered(timeout=60))
    with model.inference_session(max_length=max_length) as session:
        with monkeypatch.context() as unforwarded:
            unforwarded.setattr(InferenceSession, "_forward_targets", lambda *args: ())
            first = model.generate(prompt, max_new_tokens=1, **GREEDY)
        assert session.route is not None and session.route.spans[0].peer_id == faulty_id
        local_swarm.add_peer(0, 2, wait=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the client sees the honest peer of blocks 0:2 online
            states = [span.info.state for span in run_sync(model.swarm.view(max_age=0)).spans]
            if states.count(ServerState.ONLINE) == 4:
                break
        else:
            pytest.fail("the honest peer did not come online")
        yield model, session, faulty_id, first


def test_a_peer_forwarding_other_states_than_it_answers_is_caught_at_once_and_replaced(
    demo_model, make_swarm, connect, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A peer forwards a step's output to the next span's peer and answers the client the same output; the next
    peer's reply names what it ran on (a digest), so a peer that forwards anything else is caught at its first
    forwarded step, with no spot checks, banned and replaced, and the spans after it compute the step again (the
    next span's peer had forwarded its own wrong output on to the last span's, whose answer the client takes and
    drops)."""
    prompt = torch.tensor([[1, 200, 300, 400, 500]])
    expected = AutoModelForCausalLM.from_pretrained(demo_model).eval().generate(prompt, max_new_tokens=12, **GREEDY)
    lying = _session_through_a_lying_forwarder(demo_model, make_swarm, connect, monkeypatch, prompt, 5 + 12)
    with lying as (model, session, faulty_id, first):
        forwarded = client_metrics().forwarded_steps._value.get()
        second = model.generate(max_new_tokens=1, **GREEDY)  # forwarded: caught
        # forwarded to blocks 2:4 and on to 4:6 (answers taken and dropped), then again from the replacement
        assert client_metrics().forwarded_steps._value.get() == forwarded + 4
        assert faulty_id in model.swarm.banned() and session.reroutes == 1
        assert faulty_id not in [span.peer_id for span in session.route.spans]
        rest = model.generate(max_new_tokens=10, **GREEDY)

    assert torch.equal(first, expected[:, : prompt.shape[1] + 1])
    assert torch.equal(second, expected[:, : prompt.shape[1] + 2])
    assert torch.equal(rest, expected)


def test_a_peer_forwarding_other_states_in_a_pipelined_prefill_is_caught_and_replaced(
    demo_model, make_swarm, connect, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The same lie in the chunks of a pipelined prompt: caught at the first chunk; the route is replaced and the
    prompt sent again."""
    prompt, more = torch.tensor([[1, 200, 300, 400, 500]]), torch.tensor([[600, 700, 800, 900, 1000, 1100]])
    local = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    first_expected = local.generate(prompt, max_new_tokens=1, **GREEDY)
    lying = _session_through_a_lying_forwarder(demo_model, make_swarm, connect, monkeypatch, prompt, 32)
    with lying as (model, session, faulty_id, first):
        session.prefill_chunk_tokens = 2
        pipelined = []
        original = InferenceSession._pipelined_forwarded

        async def noted(self, chunks):  # type: ignore[no-untyped-def]
            try:
                return await original(self, chunks)
            finally:
                pipelined.append(([part.shape[1] for part in chunks], self.reroutes))

        monkeypatch.setattr(InferenceSession, "_pipelined_forwarded", noted)
        rest = model.generate(more, max_new_tokens=4, **GREEDY)  # continues the conversation
        # the first token generated and the 6 new ones, in chunks; the route was replaced before the step ended
        assert pipelined == [([2, 2, 2, 1], 1)]
        assert faulty_id in model.swarm.banned() and session.reroutes == 1
        assert faulty_id not in [span.peer_id for span in session.route.spans]

    assert torch.equal(first, first_expected)
    assert torch.equal(rest, local.generate(torch.cat([first, more], dim=1), max_new_tokens=4, **GREEDY))
