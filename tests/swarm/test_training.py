"""Training through a real swarm: losses and gradients through the peers equal local autograd on the same model.

One llama swarm over three peers serves every test; tuned clients share one client's connection to it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from swarm import DistributedModelForCausalLM, TuningConfig
from swarm.client import remote_blocks
from swarm.client._sync import run_sync
from swarm.client.transport import SpanAdapters, call_forward
from swarm.errors import InvalidRequest
from swarm.models import ModelSource, load_client_modules
from swarm.protocol import LoraHeader, SpanRequest
from swarm.testing import LocalSwarm
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE

pytestmark = [
    pytest.mark.slow,
    # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` when wrapping a model
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

GRAD_ATOL = 1e-4  # float32 through the swarm vs local autograd
SPANS = [(0, 1), (1, 3), (3, 4)]  # three peers, so gradients cross two peer boundaries


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:  # type: ignore[no-untyped-def]
    return tiny_model_dir("llama", 4)


@pytest.fixture(scope="module")
def local_swarm(model_dir, make_swarm) -> LocalSwarm:  # type: ignore[no-untyped-def]
    return make_swarm(model_dir, SPANS)


@pytest.fixture(scope="module")
def client(model_dir, local_swarm, connect) -> DistributedModelForCausalLM:  # type: ignore[no-untyped-def]
    return connect(model_dir, local_swarm)


def _tuned(client: DistributedModelForCausalLM, model_dir: Path, tuning: TuningConfig) -> DistributedModelForCausalLM:
    """A tuned model sharing `client`'s connection to the swarm (closing `client` closes it)."""
    source = ModelSource.open(model_dir)
    return DistributedModelForCausalLM(source.config, load_client_modules(source), client.swarm, tuning)


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (batch, length), generator=generator)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _assert_grads_close(actual: torch.Tensor | None, expected: torch.Tensor | None, what: str) -> float:
    assert actual is not None and expected is not None, what
    assert bool(expected.abs().max() > 0), f"{what}: the expected gradient is zero; the comparison would prove nothing"
    torch.testing.assert_close(actual, expected, atol=GRAD_ATOL, rtol=0, msg=lambda m: f"{what}: {m}")
    return float((actual - expected).abs().max())


def test_ptune_with_unfrozen_head_and_embeddings_matches_local_gradients(client, model_dir) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = _tuned(client, model_dir, TuningConfig(mode="ptune", pre_seq_len=3, tune_embeddings=True, tune_head=True))
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    local_prompts = model.prompts.prompts.detach().clone().requires_grad_(True)
    tokens = _tokens(batch=2, length=6, seed=1)

    outputs = model(tokens, labels=tokens)
    outputs.loss.backward()
    token_vectors = local.get_input_embeddings()(tokens)
    full = torch.cat([local_prompts.unsqueeze(0).expand(2, -1, -1), token_vectors], dim=1)
    expected_logits = local(inputs_embeds=full).logits[:, 3:]
    _loss(expected_logits, tokens).backward()

    torch.testing.assert_close(outputs.logits, expected_logits, atol=GRAD_ATOL, rtol=0)
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for p in [model.prompts.prompts, *model.client_modules.parameters()]
    }
    differences = {
        "prompts": _assert_grads_close(model.prompts.prompts.grad, local_prompts.grad, "prompts"),
        "embeddings": _assert_grads_close(
            model.client_modules.embeddings.weight.grad, local.get_input_embeddings().weight.grad, "embeddings"
        ),
        "lm_head": _assert_grads_close(
            model.client_modules.lm_head.weight.grad, local.get_output_embeddings().weight.grad, "lm_head"
        ),
        "final_norm": _assert_grads_close(
            model.client_modules.final_norm.weight.grad, local.model.norm.weight.grad, "final norm"
        ),
    }
    print("max |grad difference| (ptune):", differences)


def test_deep_ptune_matches_local_gradients(client, model_dir) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(8)
    model = _tuned(client, model_dir, TuningConfig(mode="deep-ptune", pre_seq_len=2))
    with torch.no_grad():
        model.prompts.block_prompts.normal_(std=0.5)  # they start at zero; make them change the output
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    local_prompts = model.prompts.prompts.detach().clone().requires_grad_(True)
    local_block_prompts = model.prompts.block_prompts.detach().clone().requires_grad_(True)

    def add_prompt(index: int):  # type: ignore[no-untyped-def]
        def hook(module, args, kwargs):  # type: ignore[no-untyped-def]
            hidden = args[0]
            return (torch.cat([hidden[:, :2] + local_block_prompts[index], hidden[:, 2:]], dim=1), *args[1:]), kwargs

        return hook

    handles = [
        layer.register_forward_pre_hook(add_prompt(i), with_kwargs=True) for i, layer in enumerate(local.model.layers)
    ]
    tokens = _tokens(batch=2, length=5, seed=9)
    try:
        outputs = model(tokens, labels=tokens)
        outputs.loss.backward()
        token_vectors = local.get_input_embeddings()(tokens)
        full = torch.cat([local_prompts.unsqueeze(0).expand(2, -1, -1), token_vectors], dim=1)
        expected_logits = local(inputs_embeds=full).logits[:, 2:]
        _loss(expected_logits, tokens).backward()
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(outputs.logits, expected_logits, atol=GRAD_ATOL, rtol=0)
    differences = {
        "prompts": _assert_grads_close(model.prompts.prompts.grad, local_prompts.grad, "prompts"),
        "block_prompts": _assert_grads_close(
            model.prompts.block_prompts.grad, local_block_prompts.grad, "block prompts"
        ),
    }
    print("max |grad difference| (deep-ptune):", differences)


def test_gradients_reach_inputs_embeds(client, model_dir) -> None:  # type: ignore[no-untyped-def]
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokens = _tokens(batch=2, length=5, seed=2)
    vectors = local.get_input_embeddings()(tokens).detach()
    ours, theirs = vectors.clone().requires_grad_(True), vectors.clone().requires_grad_(True)
    client(inputs_embeds=ours, labels=tokens).loss.backward()
    _loss(local(inputs_embeds=theirs).logits, tokens).backward()
    difference = _assert_grads_close(ours.grad, theirs.grad, "inputs_embeds")
    print("max |grad difference| (inputs_embeds):", difference)


@pytest.fixture(scope="module")
def lora_and_peft(client, model_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A LoRA-tuned swarm model with non-zero adapters, and the local model with its saved adapter loaded by peft."""
    torch.manual_seed(3)
    tuning = TuningConfig(mode="lora", lora_rank=4, lora_alpha=8, lora_target_modules=("q_proj", "v_proj", "down_proj"))
    model = _tuned(client, model_dir, tuning)
    with torch.no_grad():
        for lora_b in model.lora.lora_B:
            lora_b.normal_(std=0.2)  # B starts at zero; make the adapter change the output
    adapter_dir = tmp_path_factory.mktemp("adapter")
    model.lora.save_pretrained(adapter_dir, base_model_name_or_path=str(model_dir))
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir, is_trainable=True)
    return model, local.eval()


def test_lora_forward_and_saved_adapter_match_peft(lora_and_peft, model_dir) -> None:  # type: ignore[no-untyped-def]
    model, local = lora_and_peft
    tokens = _tokens(batch=2, length=7, seed=4)
    with torch.no_grad():
        logits = model(tokens).logits
        torch.testing.assert_close(logits, local(tokens).logits, atol=GRAD_ATOL, rtol=0)
        plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()(tokens).logits
    assert (logits - plain).abs().max() > 1e-2  # the adapter does change the output


def _lora_grad_differences(model: DistributedModelForCausalLM, local: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Backward through the swarm and locally; the largest difference over all LoRA gradients."""
    model.zero_grad()
    local.zero_grad()
    model(tokens, labels=tokens).loss.backward()
    _loss(local(tokens).logits, tokens).backward()
    local_parameters = dict(local.named_parameters())
    differences = []
    targets = model.lora.header.targets
    for index, (lora_a, lora_b) in enumerate(zip(model.lora.lora_A, model.lora.lora_B, strict=True)):
        block, target = divmod(index, len(targets))
        name = f"base_model.model.model.layers.{block}.{targets[target]}"
        for ours, kind in ((lora_a, "lora_A"), (lora_b, "lora_B")):
            differences.append(
                _assert_grads_close(ours.grad, local_parameters[f"{name}.{kind}.default.weight"].grad, name)
            )
    assert len(differences) == 2 * 3 * 4
    return max(differences)


def test_lora_gradients_match_peft(lora_and_peft) -> None:  # type: ignore[no-untyped-def]
    model, local = lora_and_peft
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.lora.parameters()}
    print("max |grad difference| (lora):", _lora_grad_differences(model, local, _tokens(batch=2, length=6, seed=5)))


def test_large_batches_are_split_into_parallel_sub_batches(  # type: ignore[no-untyped-def]
    lora_and_peft, model_dir, local_swarm, connect, monkeypatch
) -> None:
    model, local = lora_and_peft
    split_client = connect(model_dir, local_swarm, max_sub_batch_size=2)
    split = _tuned(split_client, model_dir, model.tuning)
    split.load_state_dict(model.state_dict())
    calls: list[int] = []
    original = remote_blocks.call_forward

    async def call_forward_counted(p2p, peer_id, span, hidden, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(hidden.shape[0])
        return await original(p2p, peer_id, span, hidden, *args, **kwargs)

    monkeypatch.setattr(remote_blocks, "call_forward", call_forward_counted)
    difference = _lora_grad_differences(split, local, _tokens(batch=5, length=4, seed=10))
    assert sorted(calls) == sorted([2, 2, 1] * len(SPANS))  # three parts, each through the three peers
    print("max |grad difference| (lora, batch 5 in parts of 2):", difference)


def test_ptune_training_steps_lower_the_loss(client, model_dir) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(6)
    model = _tuned(client, model_dir, TuningConfig(mode="ptune", pre_seq_len=4))
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.1)
    tokens = _tokens(batch=2, length=8, seed=7)
    losses = []
    for _ in range(4):
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_malformed_lora_is_refused_and_the_peer_keeps_serving(client) -> None:  # type: ignore[no-untyped-def]
    route = run_sync(client.swarm.make_route(0, client.swarm.num_blocks))
    first = route.spans[0]
    span, peer_id = SpanRequest(first.start, first.end), first.peer_id
    p2p = run_sync(client.swarm.p2p())
    hidden = torch.randn(1, 3, 64)
    header = LoraHeader(targets=("self_attn.q_proj",), scaling=2.0)
    blocks = first.end - first.start
    good = [torch.zeros(4, 64), torch.zeros(64, 4)] * blocks
    bad_requests = {
        "wrong shape": [torch.zeros(4, 65), torch.zeros(64, 4)] * blocks,
        "wrong dtype": [t.double() for t in good],
        "wrong count": good[:-1],
    }
    for what, tensors in bad_requests.items():
        with pytest.raises(InvalidRequest, match="LoRA"):
            run_sync(call_forward(p2p, peer_id, span, hidden, 30, SpanAdapters(lora=(header, tensors))))
            pytest.fail(f"a LoRA adapter with the {what} was accepted")
    with pytest.raises(InvalidRequest, match="not a linear layer"):
        adapters = SpanAdapters(lora=(LoraHeader(("mlp",), 1.0), good[:2] * blocks))
        run_sync(call_forward(p2p, peer_id, span, hidden, 30, adapters))
    with pytest.raises(InvalidRequest, match="deep prompts"):
        adapters = SpanAdapters(prompts=torch.zeros(blocks + 1, 2, 64))
        run_sync(call_forward(p2p, peer_id, span, hidden, 30, adapters))
    plain = run_sync(call_forward(p2p, peer_id, span, hidden, 30))
    zero_adapter = run_sync(call_forward(p2p, peer_id, span, hidden, 30, SpanAdapters(lora=(header, good))))
    torch.testing.assert_close(zero_adapter, plain, atol=0, rtol=0)  # B = 0: the adapter adds nothing
