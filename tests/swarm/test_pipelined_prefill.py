"""Pipelined prefill in a real swarm: a prompt longer than `prefill_chunk_tokens` flows down a 3-peer route in
chunks, and the logits and the generation after it equal the local model's, as with the prompt sent whole (which
the peers, started with a small `--prefill-chunk-tokens`, compute in parts)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.client.metrics import client_metrics
from swarm.client.session import InferenceSession
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE

pytestmark = pytest.mark.slow

NUM_BLOCKS = 4
LOGITS_ATOL = 1e-4


@pytest.mark.parametrize("forward_steps", [True, False], ids=["forwarded", "through-the-client"])
def test_a_chunked_prompt_gives_the_logits_of_a_whole_one(  # type: ignore[no-untyped-def]
    make_swarm, connect, tiny_model_dir, monkeypatch, forward_steps: bool
) -> None:
    model_dir = tiny_model_dir("llama", NUM_BLOCKS)
    local_swarm = make_swarm(model_dir, [(0, 1), (1, 3), (3, NUM_BLOCKS)], peer_args=["--prefill-chunk-tokens", "5"])
    pipelined = connect(model_dir, local_swarm, prefill_chunk_tokens=4, forward_steps=forward_steps)
    whole = connect(model_dir, local_swarm, prefill_chunk_tokens=0)
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (2, 19), generator=torch.Generator().manual_seed(5))
    chunked_steps = []
    original = InferenceSession._pipelined

    async def counted(self, hidden_states, chunk):  # type: ignore[no-untyped-def]
        chunked_steps.append((hidden_states.shape[1], chunk))
        return await original(self, hidden_states, chunk)

    monkeypatch.setattr(InferenceSession, "_pipelined", counted)

    with torch.no_grad():
        expected = local(prompt).logits
        for model in (pipelined, whole):
            with model.inference_session(max_length=32):
                forwarded = client_metrics().forwarded_steps._value.get()
                torch.testing.assert_close(model(prompt).logits, expected, atol=LOGITS_ATOL, rtol=0)
                if model is pipelined:  # 5 chunks, each forwarded by 2 spans' peers, or none
                    assert client_metrics().forwarded_steps._value.get() - forwarded == (10 if forward_steps else 0)
                generated = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
            assert torch.equal(generated, local.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None))
    assert chunked_steps == [(19, 4)]  # the pipelined client chunked its prompt; the other sent it whole
