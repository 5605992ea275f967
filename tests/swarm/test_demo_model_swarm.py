"""The shipped demo model split over three peers writes, token for token, what it writes on one machine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import DistributedModelForCausalLM
from swarm.demo import even_spans
from swarm.demo_model import SHIPPED_DEMO_MODEL_DIR
from swarm.testing import LocalSwarm

pytestmark = pytest.mark.slow

PROMPT = "KING.\nWhat news, my lord?"
NEW_TOKENS = 12


def test_greedy_continuation_through_three_peers_equals_local(
    make_swarm: Callable[..., LocalSwarm], connect: Callable[..., DistributedModelForCausalLM]
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_DEMO_MODEL_DIR)
    local = AutoModelForCausalLM.from_pretrained(SHIPPED_DEMO_MODEL_DIR).eval()
    spans = even_spans(local.config.num_hidden_layers, 3)
    local_swarm = make_swarm(SHIPPED_DEMO_MODEL_DIR, spans)
    distributed = connect(SHIPPED_DEMO_MODEL_DIR, local_swarm)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    options = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS, do_sample=False)

    with torch.no_grad():
        expected = local.generate(input_ids, **options)
    output = distributed.generate(input_ids, **options)

    assert torch.equal(output, expected)
    assert expected.shape[1] == input_ids.shape[1] + NEW_TOKENS  # no early EOS: every new token was compared
    assert tokenizer.decode(output[0], skip_special_tokens=True).startswith(PROMPT)
