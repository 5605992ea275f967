"""How many blocks fit: each block's weights plus its share of the KV-cache budget, within the memory a peer may use.

By default a peer may use what the device has free now (GPU memory on CUDA, available RAM otherwise) minus a
safety margin for activations, the client loop and the allocator's slack.
"""

from __future__ import annotations

import psutil
import torch
from transformers import PretrainedConfig

from swarm.models import ModelSource
from swarm.models.layout import build_on_meta, slice_config

SAFETY_FRACTION = 0.2  # of free memory left unused
SAFETY_BYTES = 512 * 2**20  # and at least this much


def block_bytes(source: ModelSource, dtype: torch.dtype) -> int:
    """Bytes of one block's weights in `dtype` (the largest block, for models with uneven ones)."""
    sizes = []
    for index in range(source.layout.num_blocks):
        model = build_on_meta(slice_config(source.config, index, index + 1))
        blocks = model.base_model.get_submodule(source.layout.blocks_attr)
        sizes.append(sum(parameter.numel() for parameter in blocks.parameters()) * dtype.itemsize)
        if len(set(sizes)) == 1 and index >= 1:
            break  # uniform models: two blocks are enough to know
    return max(sizes)


def cache_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token position takes in one block."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * kv_heads * head_dim * dtype.itemsize


def default_memory_budget(device: str) -> int:
    """Free memory on `device` now, less the safety margin."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
    else:
        free = psutil.virtual_memory().available
    return max(0, int(free - max(SAFETY_BYTES, free * SAFETY_FRACTION)))
