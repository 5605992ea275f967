"""A real swarm on 127.0.0.1: generation and logits through peers equal the same model run locally."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import DistributedModelForCausalLM
from swarm.client._sync import run_sync
from swarm.client.metrics import client_metrics
from swarm.client.session import InferenceSession
from swarm.client.transport import InferenceStream
from swarm.client.verification import CheckSchedule
from swarm.errors import ConfigError
from swarm.protocol import ForwardTarget
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE

pytestmark = pytest.mark.slow

LOGITS_ATOL = 1e-4  # float32 through the swarm vs local; measured differences are ~1e-6
# (family, blocks, spans at uneven boundaries over 2-3 peers)
SWARMS = {
    "llama": (6, [(0, 2), (2, 6)]),
    "qwen2": (6, [(0, 3), (3, 4), (4, 6)]),  # mixes full and sliding-window layers
    "gpt2": (5, [(0, 4), (1, 5)]),  # overlapping spans: routes use part of a peer's span
}


@pytest.fixture(scope="module", params=list(SWARMS))
def swarm_and_local(request, make_swarm, connect, tiny_model_dir):
    family = request.param
    num_layers, spans = SWARMS[family]
    model_dir = tiny_model_dir(family, num_layers)
    local_swarm = make_swarm(model_dir, spans)
    distributed = connect(model_dir, local_swarm)
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return distributed, local


def _prompts(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (batch, length), generator=generator)


def test_generate_matches_local_greedy(swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module]) -> None:
    distributed, local = swarm_and_local
    prompts = _prompts(batch=2, length=7, seed=0)
    expected = local.generate(prompts, max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert torch.equal(distributed.generate(prompts, max_new_tokens=24, do_sample=False, eos_token_id=None), expected)


def test_forward_logits_match_local(swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module]) -> None:
    distributed, local = swarm_and_local
    tokens = _prompts(batch=2, length=11, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(distributed(tokens).logits, local(tokens).logits, atol=LOGITS_ATOL, rtol=0)


def test_logits_to_keep_computes_the_last_positions_only(
    swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module],
) -> None:
    """As transformers' models do (generate passes 1): the LM head runs on the last N positions, in a stateless
    call and in a session."""
    distributed, local = swarm_and_local
    tokens = _prompts(batch=1, length=9, seed=5)
    with torch.no_grad():
        expected = local(tokens, logits_to_keep=3).logits
        assert expected.shape[1] == 3
        torch.testing.assert_close(distributed(tokens, logits_to_keep=3).logits, expected, atol=LOGITS_ATOL, rtol=0)
        with distributed.inference_session(max_length=16):
            in_session = distributed(tokens, logits_to_keep=3).logits
        torch.testing.assert_close(in_session, expected, atol=LOGITS_ATOL, rtol=0)


def test_sampling_with_seed_matches_local(swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module]) -> None:
    distributed, local = swarm_and_local
    prompts = _prompts(batch=1, length=5, seed=2)
    options = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=50, top_p=0.95, eos_token_id=None)
    torch.manual_seed(1234)
    expected = local.generate(prompts, **options)
    torch.manual_seed(1234)
    assert torch.equal(distributed.generate(prompts, **options), expected)


def test_chat_in_one_session_matches_local(
    swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module],
) -> None:
    distributed, local = swarm_and_local
    first_turn, second_turn = _prompts(batch=1, length=6, seed=3), _prompts(batch=1, length=3, seed=4)
    options = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
    with distributed.inference_session(max_length=64) as session:
        first = distributed.generate(first_turn, **options)
        sent_after_first = session.position
        second = distributed.generate(second_turn, **options)
    expected_first = local.generate(first_turn, **options)
    expected_second = local.generate(torch.cat([expected_first, second_turn], dim=1), **options)
    assert torch.equal(first, expected_first)
    assert torch.equal(second, expected_second)
    # the second turn sent only the new tokens (plus the last generated one), not the whole conversation again
    assert session.position - sent_after_first == second.shape[1] - 1 - sent_after_first


def test_generate_stops_at_eos(swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module]) -> None:
    distributed, local = swarm_and_local
    prompts = _prompts(batch=1, length=6, seed=5)
    greedy = local.generate(prompts, max_new_tokens=12, do_sample=False, eos_token_id=None)
    generated = greedy[0, prompts.shape[1] :].tolist()
    eos = generated[3]  # make the 4th generated token mark the end of the text
    stop_length = prompts.shape[1] + generated.index(eos) + 1  # where that token first appears
    expected = local.generate(prompts, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    result = distributed.generate(prompts, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    assert torch.equal(result, expected)
    assert result.shape[1] == stop_length < greedy.shape[1]
    assert int(result[0, -1]) == eos


def test_model_dir_holds_no_blocks_on_the_client(
    swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module],
) -> None:
    distributed, local = swarm_and_local
    client_parameters = sum(p.numel() for p in distributed.parameters())
    block_parameters = sum(p.numel() for name, p in local.named_parameters() if ".h." in name or ".layers." in name)
    assert client_parameters < sum(p.numel() for p in local.parameters()) - block_parameters + 1
    assert not any(".h." in name or ".layers." in name for name, _ in distributed.named_parameters())


def test_beam_search_is_refused_and_a_different_text_starts_the_session_over(
    swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module],
) -> None:
    distributed, local = swarm_and_local
    with pytest.raises(ConfigError, match="beam search"):
        distributed.generate(_prompts(batch=1, length=4, seed=6), max_new_tokens=3, num_beams=2)
    other = _prompts(batch=1, length=6, seed=8)
    other[0, 0] = (_prompts(batch=1, length=4, seed=7)[0, 0] + 1) % VOCAB_SIZE  # no common first token
    with torch.no_grad(), distributed.inference_session(max_length=32):
        distributed(_prompts(batch=1, length=4, seed=7))
        logits = distributed(other).logits  # a different text in the same session: the peers' caches start over
        expected = local(other).logits
    torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL, rtol=0)


def test_the_swarm_view_is_reread_only_after_the_first_step(
    swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-read of the DHT keeps every DHT node of the swarm busy for about 10 ms: a session building its route
    from the known view asks for one once its first step has returned, never during it. The route's streams open
    while transformers sets generation up (`open_soon`), and the tokens stay those of the local model."""
    distributed, local = swarm_and_local
    events: list[str] = []
    step, refresh = InferenceSession.step, distributed.swarm.refresh_view_if_stale

    async def noted_step(session: InferenceSession, hidden_states: torch.Tensor) -> torch.Tensor:
        events.append("step")
        outputs = await step(session, hidden_states)
        events.append("stepped")
        return outputs

    def noted_refresh() -> None:
        events.append("refresh")
        refresh()

    monkeypatch.setattr(InferenceSession, "step", noted_step)
    monkeypatch.setattr(CheckSchedule, "due", lambda schedule: False)  # spot checks build routes of their own
    monkeypatch.setattr(distributed.swarm, "refresh_view_if_stale", noted_refresh)
    prompt = _prompts(batch=1, length=5, seed=7)
    expected = local.generate(prompt, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert torch.equal(distributed.generate(prompt, max_new_tokens=3, do_sample=False, eos_token_id=None), expected)
    assert events == ["step", "stepped", "step", "refresh", "stepped", "step", "stepped"]


def test_a_session_opened_ahead_and_never_stepped_closes(
    swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module],
) -> None:
    """`open_soon` starts opening the route before the first step; a session closed before any step (generate
    failing in its own set-up) ends those streams and is closed for good."""
    distributed, _ = swarm_and_local
    session = InferenceSession(distributed.swarm, max_length=8)
    session.open_soon(1)
    run_sync(session.close())
    assert session.route is None
    with pytest.raises(ConfigError, match="closed"):
        run_sync(session.step(torch.zeros(1, 1, distributed.config.hidden_size)))


@pytest.mark.parametrize("forward_steps", [True, False], ids=["forwarded", "unforwarded"])
def test_peers_forward_decode_steps_to_the_next_span(
    swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module],
    monkeypatch: pytest.MonkeyPatch,
    forward_steps: bool,
) -> None:
    """With `forward_steps` each span's peer sends a step's output straight on to the next span's peer, which
    answers the client: every step, the prompt's included (the sessions open ahead of it), reaches every span
    after the first that way. Tokens equal local either way."""
    distributed, local = swarm_and_local
    monkeypatch.setattr(CheckSchedule, "due", lambda schedule: False)  # a checked step is never forwarded
    monkeypatch.setattr(distributed.swarm, "config", replace(distributed.swarm.config, forward_steps=forward_steps))
    new_tokens = 9
    forwarded, spans = _forwarded_steps_of_a_generation(distributed, local, _prompts(2, 6, seed=11), new_tokens)
    assert spans >= 2
    assert forwarded == (new_tokens * (spans - 1) if forward_steps else 0)


def _forwarded_steps_of_a_generation(
    distributed: DistributedModelForCausalLM, local: torch.nn.Module, prompt: torch.Tensor, new_tokens: int
) -> tuple[int, int]:
    """Generate in one session, check the tokens against local and that no span was replaced; the steps
    forwarded meanwhile and the route's spans."""
    forwarded = client_metrics().forwarded_steps
    expected = local.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    before = forwarded._value.get()
    with distributed.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
        output = distributed.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        assert session.route is not None and session.reroutes == 0
        spans = len(session.route.spans)
    assert torch.equal(output, expected)
    return int(forwarded._value.get() - before), spans


def test_the_client_sends_a_step_itself_when_its_push_failed(
    swarm_and_local: tuple[DistributedModelForCausalLM, torch.nn.Module],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The peers answer at once that a step is being forwarded; here every push names a session the next peer
    does not have, so it refuses them, the pushing peer tells the client on its stream, and the client sends each
    step itself: no step is lost or run twice, no peer is blamed, and the tokens equal local."""
    distributed, local = swarm_and_local
    monkeypatch.setattr(CheckSchedule, "due", lambda schedule: False)
    original_target, original_failure = InferenceStream.forward_target, InferenceStream.push_failure
    told: list[int] = []

    def unknown_session(stream: InferenceStream, *args: object) -> ForwardTarget:
        return replace(original_target(stream, *args), session="0" * 32)  # type: ignore[arg-type]

    def noted_failure(stream: InferenceStream, step: int) -> asyncio.Future[None]:
        watch = original_failure(stream, step)
        watch.add_done_callback(lambda done: None if done.cancelled() else told.append(step))
        return watch

    monkeypatch.setattr(InferenceStream, "forward_target", unknown_session)
    monkeypatch.setattr(InferenceStream, "push_failure", noted_failure)
    new_tokens = 6
    forwarded, spans = _forwarded_steps_of_a_generation(distributed, local, _prompts(1, 5, seed=12), new_tokens)
    assert forwarded == 0
    assert len(told) == new_tokens * (spans - 1)  # every push failed and was told
