"""Wide float32 linear layers on a CPU are stored column-major; values, sharing and outputs stay as they were."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from swarm.models import ModelSource, load_block_slice, load_client_modules
from swarm.models.weight_layout import is_column_major, store_wide_linears_column_major
from tests.model_factory import save_tiny_model


def test_only_wide_float32_weights_are_stored_column_major() -> None:
    torch.manual_seed(0)
    module = nn.ModuleDict({
        "wide": nn.Linear(64, 256, bias=False),
        "square": nn.Linear(64, 64),
        "narrow": nn.Linear(256, 64),
        "wide_bf16": nn.Linear(64, 256).to(torch.bfloat16),
    })  # fmt: skip
    before = {name: linear.weight.detach().clone() for name, linear in module.items()}
    rows = torch.randn(3, 64)
    expected = nn.functional.linear(rows, before["wide"])
    assert store_wide_linears_column_major(module) == 1
    assert is_column_major(module["wide"].weight)
    untouched = [name for name, linear in module.items() if linear.weight.is_contiguous()]
    assert untouched == ["square", "narrow", "wide_bf16"]
    for name, linear in module.items():
        assert torch.equal(linear.weight, before[name])
    torch.testing.assert_close(module["wide"](rows), expected)  # float32 defaults: rtol 1.3e-6, atol 1e-5


def test_tied_embeddings_and_head_stay_one_tensor() -> None:
    embeddings = nn.Embedding(300, 64)
    head = nn.Linear(64, 300, bias=False)
    head.weight = embeddings.weight
    table = embeddings.weight.detach().clone()
    assert store_wide_linears_column_major(nn.ModuleList([embeddings, head])) == 1
    assert head.weight is embeddings.weight and is_column_major(embeddings.weight)
    tokens = torch.tensor([[5, 7, 299]])
    assert torch.equal(embeddings(tokens), table[tokens])


def test_loaded_slices_and_heads_compute_as_the_checkpoints_model(tmp_path: Path) -> None:
    """The loaders store the wide weights column-major (the MLP's gate and up projections, the LM head); hidden
    states through the blocks and logits match the model built by transformers within float32 tolerance."""
    model = save_tiny_model("llama", tmp_path)
    source = ModelSource.open(tmp_path)
    blocks = load_block_slice(source, 0, 4)
    client = load_client_modules(source)
    mlp = blocks.blocks[0].mlp
    assert is_column_major(mlp.gate_proj.weight) and is_column_major(mlp.up_proj.weight)
    assert mlp.down_proj.weight.is_contiguous() and blocks.blocks[0].self_attn.q_proj.weight.is_contiguous()
    assert is_column_major(client.lm_head.weight)
    tokens = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens)
        hidden = blocks(client.embed(tokens))
        torch.testing.assert_close(hidden, _last_block(model, tokens))
        torch.testing.assert_close(client.logits(hidden), expected.logits)


def _last_block(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The last block's output, before the final norm (transformers' last hidden state is after it)."""
    outputs = {}
    handle = model.model.layers[-1].register_forward_hook(lambda module, args, output: outputs.setdefault("h", output))
    model(tokens)
    handle.remove()
    output = outputs["h"]
    return output[0] if isinstance(output, tuple) else output
