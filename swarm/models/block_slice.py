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
from swarm.models.session_attention import SessionsLayer, use_per_session_attention

# A batch of decode steps that gathers its sessions' caches copies each once (`decode_together` on a GPU, or for
# families without per-session attention): measured on CPU with 8 sessions (examples/benchmark_peer_steps.py, 58M
# Llama, blocks 0:4, one thread), the batch is 1.2x to 1.5x faster than its steps one by one at 512 cached tokens,
# 0.9x to 1.4x at 1024 and 0.6x to 0.8x at 2048. Longer caches decode one by one.
BATCHED_DECODE_MAX_TOKENS = 512


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
        self._per_session_attention = use_per_session_attention(base_model)

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
        (sliding-window layers keep only their window; the others grow in place, in one `SessionKV`)."""
        cache = DynamicCache(config=self.base_model.config)
        growing = [index for index, layer in enumerate(cache.layers) if type(layer) is DynamicLayer]
        store = SessionKV(len(growing), max_length)
        for position, index in enumerate(growing):
            cache.layers[index] = GrowingLayer(store=store, index=position)
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

    @property
    def attends_per_session(self) -> bool:
        """Whether a batch of decode steps attends per session, over each session's cache where it lies
        (`session_attention`), rather than gathering the caches into one: on a CPU, where the gathering copies
        cost more than the batch saves at long caches (0.66x at 2048 tokens, against 1.9x per session), and for the
        families that support it. On a GPU a batch gathers: each session's attention would add kernel launches to
        every layer, where gathering adds one copy per session."""
        return self._per_session_attention and self.device.type == "cpu"

    def can_decode_together(self, cache: DynamicCache) -> bool:
        """Whether a session's cache can join a batch of decode steps (`decode_together`): only growing layers
        that share one `SessionKV` (sliding-window layers keep windows of their own), and, where the batch gathers
        the caches, at most BATCHED_DECODE_MAX_TOKENS of them."""
        length = cache.get_seq_length()
        first = cache.layers[0]
        return (
            0 < length
            and (self.attends_per_session or length <= BATCHED_DECODE_MAX_TOKENS)
            and type(first) is GrowingLayer
            and all(type(layer) is GrowingLayer and layer.store is first.store for layer in cache.layers)
        )

    def decode_together(self, steps: list[tuple[torch.Tensor, DynamicCache]]) -> torch.Tensor:
        """One decode token per row for several sessions in one forward pass: each session's hidden states
        [rows, 1, hidden] (on any device) and its cache. Returns the outputs of all rows, session after session,
        on the slice's device: each session's are those of running it alone, up to float rounding, and each
        cache gets its new keys and values. The weights are read once for all sessions, which is what makes a
        batch cheaper than its steps one by one."""
        lengths = [cache.get_seq_length() for _, cache in steps]
        rows = [hidden.shape[0] for hidden, _ in steps]
        row_lengths = torch.tensor(lengths).repeat_interleave(torch.tensor(rows))  # each row's cached tokens
        hidden = torch.cat([hidden for hidden, _ in steps]).to(device=self.device, dtype=self.dtype)
        if not self.attends_per_session:
            return self._decode_gathered([cache for _, cache in steps], hidden, lengths, rows, row_lengths)
        batched = DynamicCache(config=self.base_model.config)
        batched.layers = [
            SessionsLayer([cache.layers[index] for _, cache in steps], tuple(rows), max(lengths))
            for index in range(len(batched.layers))
        ]
        return self._run_batch(hidden, batched, row_lengths, mask=None)

    def _decode_gathered(
        self,
        caches: list[DynamicCache],
        hidden: torch.Tensor,
        lengths: list[int],
        rows: list[int],
        row_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """`decode_together` through one cache gathered from the sessions', each session's cache in one copy,
        padded on the right to the longest and masked; every row's new token goes in the last column, with its
        own position, and back to its session's cache in one copy."""
        stores: list[SessionKV] = [cache.layers[0].store for cache in caches]
        longest = max(lengths)
        for store, length in zip(stores, lengths, strict=True):
            store.reserve(length + 1)  # room for the token this step gives back
        keys = torch.cat([_columns(store.keys, longest + 1) for store in stores], dim=1)  # type: ignore[arg-type]
        values = torch.cat([_columns(store.values, longest + 1) for store in stores], dim=1)  # type: ignore[arg-type]
        batched = DynamicCache(config=self.base_model.config)
        batched.layers = [
            _StepLayer(layer_keys, layer_values) for layer_keys, layer_values in zip(keys, values, strict=True)
        ]
        mask = None
        if min(lengths) < longest:  # row i holds tokens [0, its length) and the step's token in the last column
            columns = torch.arange(longest + 1)
            mask = ((columns < row_lengths[:, None]) | (columns == longest)).long().to(self.device)
        outputs = self._run_batch(hidden, batched, row_lengths, mask)
        row = 0
        for cache, store, count, length in zip(caches, stores, rows, lengths, strict=True):
            store.keys[..., length, :].copy_(keys[:, row : row + count, :, longest])  # type: ignore[index]
            store.values[..., length, :].copy_(values[:, row : row + count, :, longest])  # type: ignore[index]
            for layer in cache.layers:
                layer.length = length + 1
            row += count
        return outputs

    def _run_batch(
        self, hidden: torch.Tensor, batched: DynamicCache, row_lengths: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """A batch's forward pass: each row's token at its own session's next position, `row_lengths`."""
        kwargs = {self._cache_argument: batched}
        if self._takes_position_ids:
            kwargs["position_ids"] = row_lengths[:, None].to(self.device)
        return self.base_model(inputs_embeds=hidden, attention_mask=mask, use_cache=True, **kwargs).last_hidden_state

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


def _columns(buffer: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` token columns of a `SessionKV` buffer, zeros past its capacity: a session shorter than
    the batch's longest is padded for the batch only, its own buffer left the size it needs."""
    if buffer.shape[-2] >= count:
        return buffer[..., :count, :]
    return nn.functional.pad(buffer, (0, 0, 0, count - buffer.shape[-2]))


def _share_weights(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose attributes can change independently but whose tensors are shared."""
    clone = copy.copy(module)
    clone._modules = {name: None if child is None else _share_weights(child) for name, child in module._modules.items()}
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


class SessionKV:
    """The keys and values of one session for all the layers of a slice, in one buffer each: [layers, rows, heads,
    capacity, head_dim]. It grows for all layers at once, by doubling (up to `max_length` tokens), and starts
    zeroed, so what lies past a layer's length is always finite: a batch may read it, masked
    (`BlockSlice.decode_together`). A batch of decode steps then gathers a session's whole cache in one copy and
    gives its new token back in one, where a buffer per layer took several small operations per layer and session,
    each a kernel launch on a GPU."""

    MIN_CAPACITY = 64

    def __init__(self, num_layers: int, max_length: int | None = None):
        self.num_layers = num_layers
        self.max_length = max_length
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def holds(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether a layer's states [rows, heads, tokens, head_dim] fit these buffers (the first layer's shapes)."""
        if self.keys is None or self.values is None:
            return True
        return all(
            states.shape[:2] == buffer.shape[1:3]
            and states.shape[-1] == buffer.shape[-1]
            and states.dtype == buffer.dtype
            and states.device == buffer.device
            for states, buffer in ((key_states, self.keys), (value_states, self.values))
        )

    def reserve(self, needed: int, like: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Room for `needed` tokens in every layer: new buffers, shaped as `like` (a layer's key and value states)
        at first, with what the old ones held."""
        if needed <= self.capacity:
            return
        capacity = max(2 * needed, self.MIN_CAPACITY)
        if self.max_length is not None:
            capacity = max(needed, min(capacity, self.max_length))
        old = (self.keys, self.values)
        templates = like if self.keys is None or self.values is None else (self.keys[0], self.values[0])
        assert templates is not None, "the first reservation needs a layer's states"
        self.keys, self.values = (
            template.new_zeros(self.num_layers, *template.shape[:2], capacity, template.shape[-1])
            for template in templates
        )
        for buffer, previous in zip((self.keys, self.values), old, strict=True):
            if previous is not None:
                buffer[..., : previous.shape[-2], :].copy_(previous)


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that appends in place, into its row of the session's `SessionKV`, where
    `DynamicLayer.update` copies the whole cache into a new tensor at every step: most decode steps allocate
    nothing, and a step's cost no longer grows with the conversation's length. A layer whose states are shaped
    unlike the session's first layer's keeps a `SessionKV` of its own (such a session decodes alone)."""

    def __init__(self, max_length: int | None = None, store: SessionKV | None = None, index: int = 0):
        # no DynamicLayer.__init__: it would set `keys` and `values`, which here are views of the store
        self.store = store if store is not None else SessionKV(1, max_length)
        self.index = index
        self.length = 0
        self.is_initialized = False

    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor | None:
        return None if self.store.keys is None else self.store.keys[self.index, :, :, : self.length]

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor | None:
        return None if self.store.values is None else self.store.values[self.index, :, :, : self.length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not self.store.holds(key_states, value_states):
            self.store, self.index = SessionKV(1, self.store.max_length), 0
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):  # type: ignore[override]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        needed = self.length + key_states.shape[-2]
        self.store.reserve(needed, (key_states, value_states))
        assert self.store.keys is not None and self.store.values is not None
        self.store.keys[self.index, :, :, self.length : needed].copy_(key_states)
        self.store.values[self.index, :, :, self.length : needed].copy_(value_states)
        self.length = needed
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Keep all but the last `-tokens_to_remove` tokens (as `DynamicLayer.crop` with a negative count); the
        buffer stays, and the next update writes over what was dropped."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.length = max(self.length + tokens_to_remove, 0)


class _StepLayer(DynamicLayer):
    """A layer of `decode_together`'s batched cache: views of the gathered keys and values [rows, heads,
    cached + 1, head_dim], whose last column `update` fills with the step's token."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self._keys, self._values = keys, values
        self.keys, self.values = keys[:, :, :-1], values[:, :, :-1]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):  # type: ignore[override]
        self._keys[:, :, -1:].copy_(key_states)
        self._values[:, :, -1:].copy_(value_states)
        self.keys, self.values = self._keys, self._values
        return self.keys, self.values
