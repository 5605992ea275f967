"""Build a `BlockSlice` or the `ClientModules` of a model from its checkpoint, reading only their tensors.

Modules are built on the meta device (no memory), the needed tensors are read and assigned, and whatever
holds no checkpoint tensor (rotary frequencies and other non-persistent buffers) is initialised by the
architecture's own `initialize_weights`, exactly as `from_pretrained` would.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.errors import ConfigError, ModelError
from swarm.models.block_slice import BlockSlice, ZeroPositionEmbedding
from swarm.models.checkpoint import Checkpoint
from swarm.models.client_modules import ClientModules
from swarm.models.layout import ModelLayout, build_on_meta, load_config, prepare_config, probe_layout, slice_config
from swarm.models.weight_layout import store_wide_linears_column_major

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A checkpoint with its config and layout, opened once and shared by the loaders."""

    checkpoint: Checkpoint
    config: PretrainedConfig
    layout: ModelLayout

    @classmethod
    def open(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        attn_implementation: str | None = None,
    ) -> ModelSource:
        checkpoint = Checkpoint(name_or_path, revision=revision)
        config = prepare_config(load_config(str(checkpoint.config_dir)), attn_implementation)
        return cls(checkpoint, config, probe_layout(config, checkpoint.tensor_names))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """ "auto" is bfloat16 on GPUs and float32 elsewhere; float16 only on accelerators (CPU kernels are lacking)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ConfigError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ConfigError("float16 is for GPUs only; on CPU use bfloat16 or float32")
    return dtype


def load_block_slice(
    source: ModelSource,
    start: int,
    end: int,
    *,
    dtype: str | torch.dtype | None = None,
    device: torch.device | str = "cpu",
    on_block_read: Callable[[int], None] | None = None,
) -> BlockSlice:
    """Blocks [start, end) of the model, loaded from only their own tensors.

    `on_block_read(block_index)` is called after each block's tensors are read (for progress bars).
    """
    layout = source.layout
    layout.check_range(start, end)
    dtype = resolve_dtype(dtype, device)
    with _default_dtype(dtype):
        model = build_on_meta(slice_config(source.config, start, end))
    base = model.base_model
    setattr(base, layout.embedding_attr, None)
    setattr(base, layout.final_norm_attr, nn.Identity())
    if layout.position_embedding_attr:
        setattr(base, layout.position_embedding_attr, ZeroPositionEmbedding())
    if layout.embedding_norm_attr:
        setattr(base, layout.embedding_norm_attr, nn.Identity())

    state: dict[str, torch.Tensor] = {}
    for index in range(start, end):
        local_prefix = f"{layout.blocks_attr}.{index - start}."
        names = {
            stored: local_prefix + rest for stored, rest in layout.tensors_under(layout.block_prefix(index)).items()
        }
        state.update(_renamed(source.checkpoint.read(names), names))
        if on_block_read is not None:
            on_block_read(index)
    _materialize(base, state, device, init=base)
    base.requires_grad_(False)
    store_wide_linears_column_major(base)
    return BlockSlice(base.eval(), layout, start, end)


def load_client_modules(
    source: ModelSource, *, dtype: str | torch.dtype | None = None, device: torch.device | str = "cpu"
) -> ClientModules:
    """Embeddings, final norm and LM head of the model, without any block."""
    layout = source.layout
    dtype = resolve_dtype(dtype, device)
    with _default_dtype(dtype):
        model = build_on_meta(slice_config(source.config, 0, 0))
    base = model.base_model
    base_attrs = [layout.embedding_attr, layout.final_norm_attr, layout.position_embedding_attr]
    base_attrs += [layout.embedding_norm_attr]
    names: dict[str, str] = {}  # stored checkpoint name -> name in the holder module below
    holder = nn.Module()
    for attr in filter(None, base_attrs):
        holder.add_module(attr, getattr(base, attr))
        names.update(
            {stored: f"{attr}.{rest}" for stored, rest in layout.tensors_under(layout.base_prefix(attr)).items()}
        )
    lm_head = getattr(model, layout.lm_head_attr)
    if not layout.tie_word_embeddings:
        holder.add_module("lm_head", lm_head)
        names.update(
            {stored: f"lm_head.{rest}" for stored, rest in layout.tensors_under(f"{layout.lm_head_attr}.").items()}
        )
    _materialize(holder, _renamed(source.checkpoint.read(names), names), device, init=model)
    if layout.tie_word_embeddings:
        lm_head.to_empty(device=device)
        lm_head.weight = holder.get_submodule(layout.embedding_attr).weight
        if getattr(lm_head, "bias", None) is not None:
            nn.init.zeros_(lm_head.bias)
    holder.requires_grad_(False)
    store_wide_linears_column_major(lm_head)
    return ClientModules(
        layout,
        embeddings=getattr(holder, layout.embedding_attr),
        final_norm=getattr(holder, layout.final_norm_attr),
        lm_head=lm_head,
        position_embeddings=getattr(holder, layout.position_embedding_attr) if layout.position_embedding_attr else None,
        embedding_norm=getattr(holder, layout.embedding_norm_attr) if layout.embedding_norm_attr else None,
    ).eval()


def _materialize(
    module: nn.Module, state: dict[str, torch.Tensor], device: torch.device | str, init: nn.Module
) -> None:
    """Put `state` into the meta-built `module` on `device` and initialise what the checkpoint does not hold.

    Loaded tensors are assigned, not copied, so each is allocated once. The rest (non-persistent buffers such as
    rotary frequencies) is allocated and filled by `init`'s (a `PreTrainedModel`) own weight initialisation.
    """
    expected = {name for name, _ in module.named_parameters()}
    missing = sorted(expected - state.keys())
    if missing:
        raise ModelError(f"the checkpoint lacks tensors the model needs: {', '.join(missing[:8])}")
    targets = dict(module.named_parameters()) | dict(module.named_buffers())
    unexpected = sorted(state.keys() - targets.keys())
    if unexpected:
        raise ModelError(f"the checkpoint has tensors the model does not expect: {', '.join(unexpected[:8])}")
    state = {name: tensor.to(device=device, dtype=targets[name].dtype) for name, tensor in state.items()}
    module.load_state_dict(state, strict=False, assign=True)
    for submodule in module.modules():
        for tensors in (submodule._parameters, submodule._buffers):
            for name, tensor in tensors.items():
                if tensor is not None and tensor.is_meta:
                    empty = torch.empty_like(tensor, device=device)
                    tensors[name] = (
                        nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
                    )
    loaded = dict(module.named_parameters()) | dict(module.named_buffers())
    for name in state:
        loaded[name]._is_hf_initialized = True
    for submodule in module.modules():
        init._initialize_weights(submodule)


def _renamed(tensors: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    return {names[name]: tensor for name, tensor in tensors.items()}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
