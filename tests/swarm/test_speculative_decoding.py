"""Speculative decoding and rollback in a real swarm: the output equals plain greedy decoding whether the draft
model agrees with the target always (bonus tokens) or rarely (a rollback of the peers' caches every round), and a
session can be rewound to any earlier token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.client.speculative import speculative_generate
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE, save_tiny_model

pytestmark = pytest.mark.slow

NUM_BLOCKS = 4
NEW_TOKENS = 20
GREEDY = dict(do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:  # type: ignore[no-untyped-def]
    return tiny_model_dir("llama", NUM_BLOCKS)


@pytest.fixture(scope="module")
def model(model_dir, make_swarm, connect):  # type: ignore[no-untyped-def]
    return connect(model_dir, make_swarm(model_dir, [(0, 1), (1, NUM_BLOCKS)]))


@pytest.fixture(scope="module")
def local(model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _prompt(seed: int) -> torch.Tensor:
    return torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1, 6), generator=torch.Generator().manual_seed(seed))


def test_a_draft_that_always_agrees_gets_bonus_tokens(model, local) -> None:  # type: ignore[no-untyped-def]
    prompt = _prompt(1)
    expected = local.generate(prompt, max_new_tokens=NEW_TOKENS, **GREEDY)

    tokens, stats = speculative_generate(model, local, prompt, NEW_TOKENS, num_draft_tokens=4)

    assert torch.equal(tokens, expected)
    assert stats.acceptance == 1.0 and stats.rounds == 4  # 5 tokens per round trip: 4 guesses and a bonus


def test_a_draft_that_rarely_agrees_rolls_the_peers_back_every_round(model, local, tmp_path) -> None:  # type: ignore[no-untyped-def]
    draft = save_tiny_model("llama", tmp_path / "draft", num_layers=1, seed=7)  # other weights: mostly wrong
    prompt = _prompt(2)
    expected = local.generate(prompt, max_new_tokens=NEW_TOKENS, **GREEDY)

    for num_draft_tokens in (1, 3):
        tokens, stats = speculative_generate(model, draft, prompt, NEW_TOKENS, num_draft_tokens=num_draft_tokens)
        assert torch.equal(tokens, expected)
        assert stats.accepted < stats.drafted  # guesses were rejected: the peers' caches were rolled back


def test_a_session_rewinds_to_an_earlier_token(model, local) -> None:  # type: ignore[no-untyped-def]
    first, second = _prompt(3), _prompt(4)
    with torch.no_grad(), model.inference_session(max_length=32):
        model(first)
        model(torch.cat([first, second], dim=1))  # the peers hold 12 tokens
        rewound = model(torch.cat([first[:, :4], second], dim=1)).logits  # back to 4, then 6 new ones
        again = model(torch.cat([first[:, :4], second], dim=1)).logits  # nothing new: the last token is redone
        expected = local(torch.cat([first[:, :4], second], dim=1)).logits
    torch.testing.assert_close(rewound, expected[:, 4:], atol=1e-4, rtol=0)
    torch.testing.assert_close(again, expected[:, -1:], atol=1e-4, rtol=0)
