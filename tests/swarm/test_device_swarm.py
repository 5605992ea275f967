"""The swarm on the device and dtype given to pytest (`--device cuda --dtype bfloat16`; CPU float32 by default):
the peers, the client's own parts and the local reference all run there, and the swarm's greedy tokens equal
local generate's, also when the peers batch concurrent sessions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.models import resolve_dtype
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE
from tests.swarm.session_tools import greedy_side_by_side

pytestmark = pytest.mark.slow

NUM_BLOCKS = 6
# max |swarm - local| of the logits: float32 differs by ~1e-6 (summation order); 16-bit formats by a rounding step
LOGITS_ATOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module")
def placement(request: pytest.FixtureRequest) -> tuple[str, torch.dtype]:
    device = request.config.getoption("--device")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda, but torch sees no CUDA device here")
    return device, resolve_dtype(request.config.getoption("--dtype"), device)


@pytest.fixture(scope="module")
def swarm_and_local(placement, make_swarm, connect, tiny_model_dir):  # type: ignore[no-untyped-def]
    device, dtype = placement
    model_dir = tiny_model_dir("llama", NUM_BLOCKS)
    name = str(dtype).removeprefix("torch.")
    local_swarm = make_swarm(model_dir, [(0, 3), (3, NUM_BLOCKS)], peer_args=["--device", device, "--dtype", name])
    distributed = connect(model_dir, local_swarm, dtype=dtype, device=device, verify_rate=0.0)
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return distributed, local, device


def _prompts(batch: int, length: int, seed: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (batch, length), generator=generator).to(device)


def test_generate_matches_local_greedy_on_the_device(swarm_and_local) -> None:  # type: ignore[no-untyped-def]
    distributed, local, device = swarm_and_local
    prompts = _prompts(batch=2, length=7, seed=0, device=device)
    options = dict(max_new_tokens=24, do_sample=False, eos_token_id=None)
    expected = local.generate(prompts, **options)
    assert torch.equal(distributed.generate(prompts, **options), expected)


def test_logits_match_local_on_the_device(swarm_and_local) -> None:  # type: ignore[no-untyped-def]
    distributed, local, device = swarm_and_local
    tokens = _prompts(batch=2, length=11, seed=1, device=device)
    with torch.no_grad():
        swarm_logits, local_logits = distributed(tokens).logits, local(tokens).logits
    assert swarm_logits.device == local_logits.device
    difference = (swarm_logits.float() - local_logits.float()).abs().max().item()
    assert difference <= LOGITS_ATOL[local.dtype], f"max |swarm - local| = {difference:.3g} in {local.dtype}"


def test_batched_sessions_match_local_on_the_device(swarm_and_local) -> None:  # type: ignore[no-untyped-def]
    distributed, local, device = swarm_and_local
    prompts = [_prompts(batch=1, length=3 + 2 * i, seed=10 + i, device=device) for i in range(3)]
    new_tokens = 10

    results = greedy_side_by_side(distributed, prompts, new_tokens)
    for prompt, tokens in zip(prompts, results, strict=True):
        expected = local.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        assert torch.equal(tokens, expected)
