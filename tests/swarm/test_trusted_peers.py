"""trusted_peers in a real swarm: the first and last blocks run only on the peers the client trusts, even when an
untrusted peer offers a shorter route, and without such a peer the client says so instead of leaking."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.errors import MissingBlocksError
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE

pytestmark = pytest.mark.slow

NUM_BLOCKS = 4


def test_the_ends_of_every_route_run_on_trusted_peers(make_swarm, connect, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_model_dir("llama", NUM_BLOCKS)
    local_swarm = make_swarm(model_dir, [(0, NUM_BLOCKS), (0, 2), (2, NUM_BLOCKS)])  # one hop, or two trusted
    untrusted, first, last = (local_swarm.peer_id(peer) for peer in local_swarm.peers)
    model = connect(model_dir, local_swarm, trusted_peers=(first, last), connect_timeout=30.0)
    prompt = torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = (
        AutoModelForCausalLM.from_pretrained(model_dir)
        .eval()
        .generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
    )

    for _ in range(3):
        with model.inference_session(max_length=16) as session:
            assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None), expected)
            assert [span.peer_id for span in session.route.spans] == [first, last]
    assert untrusted not in (first, last)

    only_first = connect(model_dir, local_swarm, trusted_peers=(first,), connect_timeout=2.0)
    with pytest.raises(MissingBlocksError, match="no live peer that is trusted"):
        only_first.generate(prompt, max_new_tokens=1)
