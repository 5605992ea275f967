"""Tiny seeded random-weight causal LMs saved to disk, one per supported family, for slicing tests.

Each config is the smallest that still exercises what makes its family different (grouped-query attention,
sliding windows on some layers, learned positions, ALiBi, ...), so the whole unit suite stays fast on CPU.
Special token ids are set inside the small vocabulary: gpt2's default 50256 makes transformers log a warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

VOCAB_SIZE = 300
BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = 1, 2, 0
FIRST_ORDINARY_TOKEN = 3  # prompts drawn from [FIRST_ORDINARY_TOKEN, VOCAB_SIZE) contain no special token

# Config keywords per family; the number of layers is added by `tiny_config`.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    # layers >= max_window_layers use a 4-token sliding window, so a slice mixes full and sliding layers
    "qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    ),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "mistral": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=4
    ),
    "gpt2": dict(n_embd=64, n_head=4, n_positions=128),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4),
    "bloom": dict(hidden_size=64, n_head=4),
    "falcon": dict(hidden_size=64, num_attention_heads=4),
}
_LAYER_KEYWORD = {"gpt2": "n_layer", "bloom": "n_layer"}


def tiny_config(family: str, *, num_layers: int = 4):
    """The config of a tiny `family` model with `num_layers` decoder blocks."""
    layers = {_LAYER_KEYWORD.get(family, "num_hidden_layers"): num_layers}
    return AutoConfig.for_model(
        family,
        vocab_size=VOCAB_SIZE,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        **FAMILIES[family],
        **layers,
    )


def save_tiny_model(
    family: str,
    path: str | os.PathLike[str],
    *,
    num_layers: int = 4,
    sharded: bool = False,
    safe_serialization: bool = True,
    seed: int = 0,
) -> PreTrainedModel:
    """Build a seeded random `family` model, save it to `path` with `save_pretrained` and return it in eval mode.

    `sharded` splits the weights into many ~100 KB files plus an index, as large hub checkpoints are stored.
    `safe_serialization=False` writes `pytorch_model.bin` files instead; transformers 5 can no longer save them,
    so the safetensors files it writes are converted one by one, keeping tensor names and sharding.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers=num_layers)).eval()
    path = Path(path)
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "50GB")
    if not safe_serialization:
        _convert_to_torch_bin(path)
    return model


def _convert_to_torch_bin(path: Path) -> None:
    """Replace the safetensors files in `path` by `pytorch_model*.bin` files with the same tensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        content = json.loads(index.read_text())
        renamed = {name: _bin_name(name) for name in set(content["weight_map"].values())}
        content["weight_map"] = {tensor: renamed[file] for tensor, file in content["weight_map"].items()}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps(content, indent=2))
        index.unlink()
    for file in path.glob("*.safetensors"):
        torch.save(load_file(file), path / _bin_name(file.name))
        file.unlink()


def _bin_name(safetensors_name: str) -> str:
    """model.safetensors -> pytorch_model.bin; model-00001-of-00002.safetensors -> pytorch_model-00001-of-00002.bin"""
    return "pytorch_" + safetensors_name.removesuffix(".safetensors") + ".bin"


def save_byte_tokenizer(path: str | os.PathLike[str]) -> None:
    """Save a byte-level tokenizer (one token per byte, no merges) whose ids fit the tiny models' vocabulary:
    <pad>, <s>, </s> are 0, 1, 2 and the 256 bytes follow, so any text tokenizes offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"<pad>": PAD_TOKEN_ID, "<s>": BOS_TOKEN_ID, "</s>": EOS_TOKEN_ID}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {**specials, **{symbol: FIRST_ORDINARY_TOKEN + index for index, symbol in enumerate(alphabet)}}
    assert len(vocab) <= VOCAB_SIZE
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
