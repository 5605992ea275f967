"""Generation with trained adapters through a real swarm: `from_pretrained(..., adapter=DIR)` sends the adapter to
every peer of an inference session once, the peers apply it to each step, and the tokens equal local generation
with the same adapter (PEFT for LoRA; hooks on the local model for deep prompts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from swarm.client.tuning import SoftPrompts
from swarm.testing import LocalSwarm
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE

pytestmark = [
    pytest.mark.slow,
    # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` when wrapping a model
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

LOGITS_ATOL = 1e-4  # float32 through the swarm vs the local model
NUM_BLOCKS = 4
GREEDY = dict(do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:  # type: ignore[no-untyped-def]
    return tiny_model_dir("llama", NUM_BLOCKS)


@pytest.fixture(scope="module")
def local_swarm(model_dir, make_swarm) -> LocalSwarm:  # type: ignore[no-untyped-def]
    return make_swarm(model_dir, [(0, 1), (1, NUM_BLOCKS)])


def _prompt(length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1, length), generator=generator)


def test_a_peft_lora_adapter_generates_through_the_swarm_as_peft_does_locally(
    model_dir, local_swarm, connect, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(5)
    lora_config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    local = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora_config).eval()
    local.save_pretrained(tmp_path)
    prompt = _prompt(6, seed=1)
    expected = local.generate(input_ids=prompt, max_new_tokens=16, **GREEDY)
    with local.disable_adapter():
        plain = local.generate(input_ids=prompt, max_new_tokens=16, **GREEDY)
    assert not torch.equal(expected, plain), "the adapter must change the tokens, or the test proves nothing"

    model = connect(model_dir, local_swarm, adapter=tmp_path)

    assert torch.equal(model.generate(prompt, max_new_tokens=16, **GREEDY), expected)
    with torch.no_grad(), model.inference_session(max_length=12):
        first = model(prompt).logits
        second = model(torch.cat([prompt, expected[:, 6:9]], dim=1)).logits  # 3 more tokens, cached prefix
        local_logits = local(input_ids=expected[:, :9]).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), local_logits, atol=LOGITS_ATOL, rtol=0)


def _local_greedy_with_prompts(
    local: torch.nn.Module, prompts: SoftPrompts, prompt: torch.Tensor, steps: int
) -> torch.Tensor:
    """Greedy tokens of the local model with soft prompts in front and deep prompts added before each block,
    recomputing the whole sequence at every step (no cache: independent of the session's cache handling)."""
    length = prompts.pre_seq_len

    def add_prompt(block_prompts: torch.Tensor):  # type: ignore[no-untyped-def]
        def hook(module, args, kwargs):  # type: ignore[no-untyped-def]
            hidden = args[0]
            return (torch.cat([hidden[:, :length] + block_prompts, hidden[:, length:]], dim=1), *args[1:]), kwargs

        return hook

    assert prompts.block_prompts is not None
    handles = [
        layer.register_forward_pre_hook(add_prompt(block_prompts), with_kwargs=True)
        for layer, block_prompts in zip(local.model.layers, prompts.block_prompts, strict=True)
    ]
    tokens = prompt
    try:
        with torch.no_grad():
            for _ in range(steps):
                vectors = prompts.prepend(local.get_input_embeddings()(tokens))
                next_token = local(inputs_embeds=vectors).logits[:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, next_token], dim=1)
    finally:
        for handle in handles:
            handle.remove()
    return tokens


def test_saved_deep_prompts_generate_through_the_swarm_as_locally(model_dir, local_swarm, connect, tmp_path) -> None:  # type: ignore[no-untyped-def]
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(6)
    prompts = SoftPrompts(3, local.config.hidden_size, num_blocks=NUM_BLOCKS, std=1.0)
    with torch.no_grad():
        prompts.block_prompts.normal_(std=1.0)  # they start at zero; make them change the output
    prompts.save_pretrained(tmp_path)
    prompt = _prompt(5, seed=2)
    expected = _local_greedy_with_prompts(local, prompts, prompt, steps=10)
    plain = local.generate(prompt, max_new_tokens=10, **GREEDY)
    assert not torch.equal(expected, plain), "the prompts must change the tokens, or the test proves nothing"

    model = connect(model_dir, local_swarm, adapter=tmp_path)

    assert model.prompts is not None and not model.prompts.prompts.requires_grad  # applied, frozen
    assert torch.equal(model.generate(prompt, max_new_tokens=10, **GREEDY), expected)
    with model.inference_session(max_length=20):  # a two-turn chat: prompts go in front of the first turn only
        first = model.generate(prompt, max_new_tokens=4, **GREEDY)
        second = model.generate(expected[:, 9:11], max_new_tokens=3, **GREEDY)
    assert torch.equal(first, expected[:, :9])
    assert torch.equal(second, expected[:, :14])  # the second turn is the greedy continuation: so is its answer
