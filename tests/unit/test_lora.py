"""LoRA pieces that need no swarm: the wire header, the peer's checks, per-request hooks, the client's adapters."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from swarm.client.lora import LoraAdapters
from swarm.client.tuning import TuningConfig
from swarm.errors import ConfigError, ProtocolError
from swarm.models.layout import probe_layout
from swarm.models.lora import applied_lora, check_lora, find_targets
from swarm.protocol import LoraHeader
from tests.model_factory import tiny_config


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", num_layers=2)).eval()


def test_lora_header_round_trips_and_rejects_bad_fields() -> None:
    header = LoraHeader(targets=("self_attn.q_proj", "mlp.down_proj"), scaling=2.0)
    assert LoraHeader.from_wire(header.to_wire()) == header
    for wire in [
        {"targets": [], "scaling": 1.0},
        {"targets": ["a", "a"], "scaling": 1.0},
        {"targets": [3], "scaling": 1},
    ]:
        with pytest.raises(ProtocolError):
            LoraHeader.from_wire(wire)
    with pytest.raises(ProtocolError, match="scaling"):
        LoraHeader.from_wire({"targets": ["a"]})


def test_tuning_config_is_validated() -> None:
    assert TuningConfig(mode="lora", lora_target_modules=["q_proj"]).lora_target_modules == ("q_proj",)
    for kwargs in [{"mode": "prefix"}, {"mode": "deep-ptune", "pre_seq_len": 0}, {"lora_rank": 0}]:
        with pytest.raises(ConfigError):
            TuningConfig(**kwargs)
    with pytest.raises(ConfigError, match="list of module names"):
        TuningConfig(mode="lora", lora_target_modules="q_proj")


def test_find_targets_matches_names_like_peft(llama) -> None:  # type: ignore[no-untyped-def]
    block = llama.model.layers[0]
    assert list(find_targets(block, ["q_proj", "down_proj"])) == ["self_attn.q_proj", "mlp.down_proj"]
    with pytest.raises(ConfigError, match="match no layer"):
        find_targets(block, ["query_key_value"])
    with pytest.raises(ConfigError, match=r"only nn\.Linear"):
        find_targets(block, ["input_layernorm"])


def test_check_lora_names_the_problem(llama) -> None:  # type: ignore[no-untyped-def]
    blocks = list(llama.model.layers)
    header = LoraHeader(targets=("self_attn.k_proj",), scaling=1.0)  # k_proj is 64 -> 32 (grouped-query attention)
    good = [torch.zeros(2, 64), torch.zeros(32, 2)] * 2
    check_lora(blocks, header, good, torch.float32)
    with pytest.raises(ProtocolError, match="needs 4 tensors"):
        check_lora(blocks, header, good[:2], torch.float32)
    with pytest.raises(ProtocolError, match=r"lora_B \[32, rank\]"):
        check_lora(blocks, header, [torch.zeros(2, 64), torch.zeros(64, 2)] * 2, torch.float32)
    with pytest.raises(ProtocolError, match="float64"):
        check_lora(blocks, header, [t.double() for t in good], torch.float32)
    with pytest.raises(ProtocolError, match="not a linear layer"):
        check_lora(blocks, LoraHeader(("self_attn",), 1.0), good, torch.float32)


def test_applied_lora_adds_the_low_rank_term_only_inside_the_with(llama) -> None:  # type: ignore[no-untyped-def]
    block = llama.model.layers[0]
    linear = block.self_attn.q_proj
    x = torch.randn(2, 3, 64)
    lora_a, lora_b = torch.randn(4, 64), torch.randn(64, 4)
    plain = linear(x)
    with applied_lora([block], LoraHeader(("self_attn.q_proj",), 0.5), [lora_a, lora_b]):
        adapted = linear(x)
    torch.testing.assert_close(adapted, plain + 0.5 * (x @ lora_a.T @ lora_b.T))
    torch.testing.assert_close(linear(x), plain, atol=0, rtol=0)  # the hook is gone
    assert not linear._forward_hooks


def test_lora_adapters_start_as_identity_and_save_in_peft_layout(llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = llama.config
    layout = probe_layout(config, list(llama.state_dict()))
    adapters = LoraAdapters(config, layout, rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    assert adapters.header == LoraHeader(("self_attn.q_proj", "self_attn.v_proj"), 2.0)
    tensors = adapters.tensors()
    assert [tuple(t.shape) for t in tensors[:4]] == [(4, 64), (64, 4), (4, 64), (32, 4)]
    assert len(tensors) == 2 * 2 * config.num_hidden_layers
    assert all(not bool(b.any()) for b in adapters.lora_B)
    adapters.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in saved
    assert len(saved) == len(tensors)
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0


@pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)  # peft 0.21 on transformers 5
def test_a_peft_written_adapter_loads_with_its_weights_and_scaling(llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    peft_config = LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"], init_lora_weights=False, use_rslora=True
    )  # random, non-zero B
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(llama.config), peft_config)
    peft_model.save_pretrained(tmp_path)
    layout = probe_layout(llama.config, list(llama.state_dict()))

    adapters = LoraAdapters.from_pretrained(tmp_path, llama.config, layout)

    assert adapters.header == LoraHeader(("self_attn.q_proj", "mlp.down_proj"), 6 / 2**0.5)
    weights = dict(peft_model.named_parameters())
    expected = weights["base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"]
    assert bool(expected.abs().max() > 0)
    torch.testing.assert_close(adapters.lora_B[3], expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "not supported"),
        ({"bias": "all"}, "not supported"),
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"target_modules": ".*proj"}, "list of module names"),
        ({"r": 3}, r"is \[2, 64\], this model needs \[3, 64\]"),
    ],
)
def test_unsupported_or_mismatched_adapters_are_refused(llama, tmp_path, change, message) -> None:  # type: ignore[no-untyped-def]
    layout = probe_layout(llama.config, list(llama.state_dict()))
    LoraAdapters(llama.config, layout, rank=2, alpha=4.0, target_modules=("q_proj",)).save_pretrained(tmp_path)
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**adapter_config, **change}))
    with pytest.raises(ConfigError, match=message):
        LoraAdapters.from_pretrained(tmp_path, llama.config, layout)


def test_a_directory_without_an_adapter_is_refused(llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    layout = probe_layout(llama.config, list(llama.state_dict()))
    with pytest.raises(ConfigError, match=r"adapter_config\.json"):
        LoraAdapters.from_pretrained(tmp_path, llama.config, layout)
