"""Per-session attention in a batch of decode steps: the batch's matrix products run once for all its sessions,
while each session attends over its own KV cache where it lies, with no copy into a padded batch.

A block slice opts in (`use_per_session_attention`) by naming PER_SESSION_SDPA as its attention implementation,
which transformers looks up at every forward. For ordinary tensors it is transformers' sdpa function itself, and
its masks are built as sdpa's, so prompts, single steps and training run exactly as before. Only the cache layers
of a batch (`SessionsLayer`) hand it keys and values per session (`SessionStates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PER_SESSION_SDPA = "blockswarm_per_session_sdpa"
# families whose attention layers hand the cache's keys and values straight to the attention function
PER_SESSION_FAMILIES = frozenset({"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True, slots=True)
class SessionStates:
    """One layer's keys (or values) of a batch's sessions, each [rows, kv_heads, its cached tokens + 1, head_dim]."""

    parts: tuple[torch.Tensor, ...]
    rows: tuple[int, ...]


def per_session_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | SessionStates,
    value: torch.Tensor | SessionStates,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention; for a batch's `SessionStates`, that of each session's rows over its own keys
    and values. A mask, if any, is sized to the batch's longest session (`SessionsLayer.get_mask_sizes`): each
    session takes the columns of its own positions."""
    if not isinstance(key, SessionStates) or not isinstance(value, SessionStates):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # type: ignore[arg-type]
    outputs, row = [], 0
    for keys, values, count in zip(key.parts, value.parts, key.rows, strict=True):
        mask = None if attention_mask is None else attention_mask[row : row + count, ..., : keys.shape[-2]]
        output, _ = sdpa_attention_forward(module, query[row : row + count], keys, values, mask, **kwargs)
        outputs.append(output)
        row += count
    return torch.cat(outputs), None


def use_per_session_attention(base_model: PreTrainedModel) -> bool:
    """Switch a slice's base model from sdpa to PER_SESSION_SDPA, if its family hands the cache's states straight
    to the attention function; returns whether the model attends per session in a batch."""
    config = base_model.config
    if config._attn_implementation == PER_SESSION_SDPA:
        return True
    if config._attn_implementation != "sdpa" or config.model_type not in PER_SESSION_FAMILIES:
        return False
    ALL_ATTENTION_FUNCTIONS.register(PER_SESSION_SDPA, per_session_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PER_SESSION_SDPA, sdpa_mask)
    config._attn_implementation = PER_SESSION_SDPA
    return True


class SessionsLayer(DynamicLayer):
    """A layer of a batch's cache: each session's new keys and values go into its own cache layer, in place, and
    the attention function gets each session's whole keys and values from there (`SessionStates`)."""

    def __init__(self, layers: list[DynamicLayer], rows: tuple[int, ...], longest: int):
        super().__init__()
        self.layers, self.rows, self.longest = layers, rows, longest
        self.device, self.is_initialized = layers[0].device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):  # type: ignore[override]
        keys, values = [], []
        for layer, new_keys, new_values in zip(
            self.layers, key_states.split(self.rows), value_states.split(self.rows), strict=True
        ):
            session_keys, session_values = layer.update(new_keys, new_values)
            keys.append(session_keys)
            values.append(session_values)
        return SessionStates(tuple(keys), self.rows), SessionStates(tuple(values), self.rows)

    def get_seq_length(self) -> int:
        return self.longest

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # type: ignore[override]
        return self.longest + query_length, 0
