"""Where a decode token's time goes (swarm/token_time.py): the local model's parts timed by forward hooks that leave
the model as it was, and a peer's steps read from its real metrics endpoint."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM

from monitoring.peer_metrics import PeerMetrics, serving_metrics
from swarm.token_time import local_token_time, swarm_token_time
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE, tiny_config

NEW_TOKENS = 6


def test_the_local_models_blocks_and_head_are_timed_and_the_hooks_removed() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    prompt = torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1, 5), generator=torch.Generator().manual_seed(0))
    blocks, head = model.model.layers, model.lm_head

    token = local_token_time(
        blocks, head, lambda: model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    )

    assert token.blocks_s > 0 and token.head_s > 0 and token.peer_blocks_s == ()
    assert token.total_s > token.head_s  # a token's interval holds its head pass, and its blocks' pass
    for module in (blocks[0], blocks[-1], head):
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_a_peers_steps_are_read_from_its_metrics_and_the_clients_head_timed() -> None:
    metrics = PeerMetrics(CollectorRegistry())
    metrics.record_step("decode", 1.0, 1)  # before the generation: not counted
    metrics.record_step("prefill", 2.0, 5)  # a prompt: not a decode step
    head = torch.nn.Linear(8, 16)
    hidden = torch.zeros(1, 1, 8)

    def generate() -> None:
        for step in range(NEW_TOKENS):
            if step:  # the prompt's pass has no decode step
                metrics.record_step("decode", 0.25 if step % 2 else 0.75, 1)
            head(hidden)

    with serving_metrics(metrics.registry, 0) as server:
        assert server is not None
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        token = swarm_token_time(head, [url, url], generate)  # the same peer twice: a route of two spans
        with pytest.raises(RuntimeError, match="ran no decode step"):
            swarm_token_time(head, [url], lambda: head(hidden))

    assert token.peer_blocks_s == pytest.approx((0.45, 0.45))  # (0.25 + 0.75 + 0.25 + 0.75 + 0.25) / 5
    assert token.blocks_s == pytest.approx(0.9)
    assert token.head_s > 0 and token.total_s > 0
