"""Decode steps of concurrent sessions batched on the peers: each session's greedy tokens equal what local
generation gives for its own prompt, while the peers' forward passes serve several sessions at once."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE
from tests.prometheus_tools import scrape
from tests.swarm.session_tools import greedy_side_by_side

pytestmark = pytest.mark.slow

NUM_BLOCKS = 4
NEW_TOKENS = 12
SESSIONS = 6


def test_concurrent_sessions_get_their_own_tokens_from_batched_steps(make_swarm, connect, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_model_dir("llama", NUM_BLOCKS)
    local_swarm = make_swarm(model_dir, [(0, 2), (2, NUM_BLOCKS)], peer_args=["--metrics-port", "0"])
    urls = [local_swarm.metrics_url(peer) for peer in local_swarm.peers]
    model = connect(model_dir, local_swarm, verify_rate=0.0)
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    generator = torch.Generator().manual_seed(11)
    prompts = [  # different lengths and batch rows: caches of different lengths in one batch
        torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1 + i % 2, 3 + 2 * i), generator=generator)
        for i in range(SESSIONS)
    ]

    results = greedy_side_by_side(model, prompts, NEW_TOKENS)
    with torch.no_grad():
        for prompt, tokens in zip(prompts, results, strict=True):
            expected = local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
            assert torch.equal(tokens, expected)

    for url in urls:
        metrics = scrape(url)
        passes = metrics["blockswarm_decode_batch_sessions_count{}"]
        alone = metrics['blockswarm_decode_batch_sessions_bucket{le="1.0"}']
        assert passes < SESSIONS * (NEW_TOKENS - 1)  # fewer forward passes than decode steps ...
        assert passes - alone > 0  # ... because some served several sessions at once
