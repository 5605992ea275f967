"""Decoder blocks [start, end) of one model, run by the architecture's own base-model code.

The slice is the architecture's base-model class built with `end - start` blocks (renumbered from 0, so a
per-slice KV cache is dense) whose input embeddings, position embeddings, embedding norm and final norm are
removed: the client runs those. Masks, rotary or ALiBi position encodings and sliding windows are built by
transformers itself, so one code path serves every family the layout probe accepts.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from swarm.errors import BlockRangeError
from swarm.models.layout import ModelLayout, slice_config

# A batch of decode steps copies every session's cache once (`_OneStepLayer`): measured on CPU with 8 sessions
# (examples/benchmark_peer_steps.py), the batch is 3.5x faster than its steps one by one at 32 cached tokens, 2.7x
# at 128, even at 512 and 2x slower at 2048. Longer caches decode one by one.
BATCHED_DECODE_MAX_TOKENS = 256


class ZeroPositionEmbedding(nn.Module):
    """Stands in for learned position embeddings inside a slice: the client already added them."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=position_ids.device)


class BlockSlice(nn.Module):
    """Blocks [start, end) of a model; `forward` runs hidden states through them with an optional KV cache."""

    def __init__(self, base_model: PreTrainedModel, layout: ModelLayout, start: int, end: int):
        super().__init__()
        self.base_model = base_model
        self.layout = layout
        self.start = start
        self.end = end
        parameters = inspect.signature(base_model.forward).parameters
        self._takes_position_ids = "position_ids" in parameters
        # transformers renamed `past_key_values` to `cache` in 5.24 and warns on the old name
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def config(self):
        return self.base_model.config

    @property
    def hidden_size(self) -> int:
        return self.base_model.config.hidden_size

    @property
    def blocks(self) -> list[nn.Module]:
        """The decoder blocks of the slice, first to last."""
        return list(getattr(self.base_model, self.layout.blocks_attr))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base_model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def sub_slice(self, start: int, end: int) -> BlockSlice:
        """Blocks [start, end) of this slice as a slice of their own, sharing this slice's weights."""
        if (start, end) == (self.start, self.end):
            return self
        if not self.start <= start < end <= self.end:
            raise BlockRangeError(f"blocks {start}:{end} are not within the hosted blocks {self.start}:{self.end}")
        base = _share_weights(self.base_model)
        blocks = getattr(base, self.layout.blocks_attr)
        kept = nn.ModuleList(list(blocks)[start - self.start : end - self.start])
        for local_index, block in enumerate(kept):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = local_index  # a session cache of the sub-slice is dense from 0
        setattr(base, self.layout.blocks_attr, kept)
        base.config = slice_config(self.config, start - self.start, end - self.start)
        return BlockSlice(base, self.layout, start, end)

    def new_cache(self, max_length: int | None = None) -> DynamicCache:
        """An empty KV cache for one session of this slice, of up to `max_length` tokens per row when given
        (sliding-window layers keep only their window; the others grow in place, `GrowingLayer`)."""
        cache = DynamicCache(config=self.base_model.config)
        cache.layers = [GrowingLayer(max_length) if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache

    @staticmethod
    def rollback(cache: DynamicCache, position: int) -> None:
        """Forget every token from `position` on (speculative decoding, a rewound conversation). A sliding-window
        layer that has already dropped its oldest tokens cannot go back: ValueError, and the cache is unchanged."""
        cached = cache.get_seq_length()
        if not 0 <= position <= cached:
            raise ValueError(f"cannot roll back to position {position}: the cache holds {cached} tokens")
        for layer in cache.layers:
            window = getattr(layer, "sliding_window", None)
            if getattr(layer, "is_sliding", False) and window is not None and layer.get_seq_length() >= window:
                raise ValueError(
                    f"cannot roll back to position {position}: this model's sliding-window layers keep only their "
                    f"last {window - 1} tokens, and the session is past them"
                )
        if position < cached:
            cache.crop(position - cached)

    @staticmethod
    def can_decode_together(cache: DynamicCache) -> bool:
        """Whether a session's cache can join a batch of decode steps (`decode_together`): only growing layers
        (sliding-window layers keep windows of their own), and at most BATCHED_DECODE_MAX_TOKENS of them."""
        length = cache.get_seq_length()
        return 0 < length <= BATCHED_DECODE_MAX_TOKENS and all(type(layer) is GrowingLayer for layer in cache.layers)

    def decode_together(self, steps: list[tuple[torch.Tensor, DynamicCache]]) -> list[torch.Tensor]:
        """One decode token per row for several sessions in one forward pass: the outputs of each (hidden states
        [rows, 1, hidden] and its cache) are those of running it alone, up to float rounding, and each cache gets
        its new keys and values.

        The sessions' caches differ in length: they are left-padded to the longest in a batched cache, the
        padding masked out, and every row gets its own position. The weights are read once for all sessions,
        which is what makes a batch cheaper than its steps one by one."""
        lengths = [cache.get_seq_length() for _, cache in steps]
        longest = max(lengths)
        rows = [hidden.shape[0] for hidden, _ in steps]
        device = steps[0][0].device
        batched = DynamicCache(config=self.base_model.config)
        batched.layers = [
            _OneStepLayer([cache.layers[index] for _, cache in steps], lengths)
            for index in range(len(steps[0][1].layers))
        ]
        mask = torch.zeros(sum(rows), longest + 1, dtype=torch.long, device=device)
        positions = torch.empty(sum(rows), 1, dtype=torch.long, device=device)
        row = 0
        for count, length in zip(rows, lengths, strict=True):
            mask[row : row + count, longest - length :] = 1
            positions[row : row + count] = length
            row += count
        kwargs = {self._cache_argument: batched}
        if self._takes_position_ids:
            kwargs["position_ids"] = positions
        hidden = torch.cat([hidden for hidden, _ in steps])
        outputs = self.base_model(inputs_embeds=hidden, attention_mask=mask, use_cache=True, **kwargs).last_hidden_state
        row = 0
        for count, (_, cache) in zip(rows, steps, strict=True):
            for index, layer in enumerate(batched.layers):
                cache.update(layer.keys[row : row + count, :, -1:], layer.values[row : row + count, :, -1:], index)
            row += count
        return list(outputs.split(rows))

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        cache: DynamicCache | None = None,
        position: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run [batch, seq, hidden] states that start at token `position` through the blocks.

        With a cache, `position` must equal the number of tokens the cache already holds; the new keys and
        values are appended to it. `attention_mask` is the optional 2-D [batch, position + seq] padding mask.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden states must be [batch, seq, {self.hidden_size}], got {list(hidden_states.shape)}")
        if cache is not None and cache.get_seq_length() != position:
            raise ValueError(f"step starts at position {position}, but the cache holds {cache.get_seq_length()} tokens")
        kwargs = {self._cache_argument: cache}
        if self._takes_position_ids:
            batch, seq = hidden_states.shape[:2]
            positions = torch.arange(position, position + seq, device=hidden_states.device)
            kwargs["position_ids"] = positions.unsqueeze(0).expand(batch, seq)
        output = self.base_model(
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            use_cache=cache is not None,
            **kwargs,
        )
        return output.last_hidden_state


def _share_weights(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose attributes can change independently but whose tensors are shared."""
    clone = copy.copy(module)
    clone._modules = {name: None if child is None else _share_weights(child) for name, child in module._modules.items()}
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that appends in place, into a buffer that doubles when full (up to
    `max_length` tokens), where `DynamicLayer.update` copies the whole cache into a new tensor at every step:
    most decode steps allocate nothing, and a step's cost no longer grows with the conversation's length."""

    MIN_CAPACITY = 64

    def __init__(self, max_length: int | None = None):
        super().__init__()
        self.max_length = max_length
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):  # type: ignore[override]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if self._keys is None or self._values is None or needed > self._keys.shape[-2]:
            capacity = max(2 * needed, self.MIN_CAPACITY)
            if self.max_length is not None:
                capacity = max(needed, min(capacity, self.max_length))
            self._keys, self._values = (
                new.new_empty(*new.shape[:2], capacity, new.shape[-1]) for new in (key_states, value_states)
            )
            if length:
                self._keys[:, :, :length].copy_(self.keys)
                self._values[:, :, :length].copy_(self.values)
        self._keys[:, :, length:needed].copy_(key_states)
        self._values[:, :, length:needed].copy_(value_states)
        self.keys, self.values = self._keys[:, :, :needed], self._values[:, :, :needed]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        """Keep all but the last `-tokens_to_remove` tokens (as `DynamicLayer.crop` with a negative count); the
        buffer stays, and the next update writes over what was dropped."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized or self._keys is None or self._values is None:
            return
        kept = max(self.get_seq_length() + tokens_to_remove, 0)
        self.keys, self.values = self._keys[:, :, :kept], self._values[:, :, :kept]


class _OneStepLayer(DynamicLayer):
    """A layer of `decode_together`'s batched cache: the sessions' keys and values left-padded into one buffer with
    room for the step's token, which `update` writes in place. (Padding and concatenating, then appending with
    `DynamicLayer.update`, copied every session's whole cache three times per step; with caches of 512 tokens
    that made a batch of 8 slower than its steps one by one.)"""

    def __init__(self, layers: list[DynamicLayer], lengths: list[int]):
        super().__init__()
        longest = max(lengths)
        first = layers[0].keys
        self._keys, self._values = (
            first.new_empty(sum(layer.keys.shape[0] for layer in layers), first.shape[1], longest + 1, size)
            for size in (first.shape[-1], layers[0].values.shape[-1])
        )
        row = 0
        for layer, length in zip(layers, lengths, strict=True):
            count = layer.keys.shape[0]
            for buffer, cached in ((self._keys, layer.keys), (self._values, layer.values)):
                buffer[row : row + count, :, : longest - length].zero_()  # masked out, but never garbage (NaN)
                buffer[row : row + count, :, longest - length : longest].copy_(cached)
            row += count
        self.keys, self.values = self._keys[:, :, :longest], self._values[:, :, :longest]
        self.device, self.is_initialized = first.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):  # type: ignore[override]
        length = self.keys.shape[-2]
        self._keys[:, :, length : length + key_states.shape[-2]].copy_(key_states)
        self._values[:, :, length : length + value_states.shape[-2]].copy_(value_states)
        self.keys = self._keys[:, :, : length + key_states.shape[-2]]
        self.values = self._values[:, :, : length + value_states.shape[-2]]
        return self.keys, self.values
