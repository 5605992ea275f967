"""Where the parts of a decoder-only causal LM live, found by probing the architecture's own classes.

One generic adapter serves every family with the standard layout (llama, mistral, qwen2/3, gpt2, gpt_neox,
bloom, falcon, ...): a base model with input embeddings, a `ModuleList` of decoder blocks and a final norm,
wrapped by a causal-LM class with an LM head. The probe builds the model on the meta device (no memory),
names each part, and refuses architectures with parts it cannot place, so a model is either sliced exactly or
rejected with a clear error, never run wrong.

Input-side extras that the client runs before block 0 (they are not blocks):
  * learned position embeddings (`wpe`, gpt2), added to the token embeddings at the token's position;
  * an embedding layer norm (`word_embeddings_layernorm`, bloom).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from swarm.errors import BlockRangeError, UnsupportedModelError

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
POSITION_EMBEDDING_NAMES = ("wpe",)
EMBEDDING_NORM_NAMES = ("word_embeddings_layernorm",)


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """Names of a model's parts, in its module tree and in its checkpoint."""

    model_type: str
    num_blocks: int
    causal_lm_class: type[PreTrainedModel]
    base_model_attr: str  # attribute of the causal LM holding the base model ("model", "transformer", ...)
    checkpoint_prefix: str  # prefix of base-model tensors in the checkpoint ("model.", "transformer." or "")
    blocks_attr: str  # ModuleList of decoder blocks in the base model ("layers", "h")
    embedding_attr: str
    position_embedding_attr: str | None
    embedding_norm_attr: str | None
    final_norm_attr: str
    lm_head_attr: str
    tie_word_embeddings: bool
    # name as the model's modules call it -> name stored in the checkpoint (transformers renames some on load)
    tensor_names: Mapping[str, str] = field(repr=False, default_factory=dict)

    def tensors_under(self, prefix: str) -> dict[str, str]:
        """Stored checkpoint name -> name relative to `prefix`, for every tensor under `prefix`."""
        return {stored: name[len(prefix) :] for name, stored in self.tensor_names.items() if name.startswith(prefix)}

    def block_prefix(self, block_index: int) -> str:
        return f"{self.checkpoint_prefix}{self.blocks_attr}.{block_index}."

    def base_prefix(self, attr: str) -> str:
        return f"{self.checkpoint_prefix}{attr}."

    def check_range(self, start: int, end: int) -> None:
        if not (0 <= start < end <= self.num_blocks):
            raise BlockRangeError(
                f"block range {start}:{end} is outside the model: it has {self.num_blocks} blocks, "
                f"so a range must satisfy 0 <= start < end <= {self.num_blocks}"
            )


def prepare_config(config: PretrainedConfig, attn_implementation: str | None = None) -> PretrainedConfig:
    """A copy of `config` with the attention implementation set explicitly (sdpa where supported)."""
    config = copy.deepcopy(config)
    if attn_implementation is None:
        causal_lm_class = _causal_lm_class(config)
        attn_implementation = "sdpa" if getattr(causal_lm_class, "_supports_sdpa", False) else "eager"
    config._attn_implementation = attn_implementation
    return config


def slice_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """The config of a model made of blocks [start, end) only: per-layer lists are sliced to match."""
    num_blocks = config.num_hidden_layers
    sliced = copy.deepcopy(config)
    for name, value in vars(config).items():
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == num_blocks:
            setattr(sliced, name, type(value)(value[start:end]))
    sliced.num_hidden_layers = end - start
    return sliced


def build_on_meta(config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM of `config` on the meta device: its structure, no memory."""
    with torch.device("meta"):
        return _causal_lm_class(config)(config)


def probe_layout(config: PretrainedConfig, tensor_names: list[str]) -> ModelLayout:
    """Name the parts of `config`'s architecture and find them among the checkpoint's stored tensor names."""
    causal_lm_class = _causal_lm_class(config)
    num_blocks = config.num_hidden_layers
    model = build_on_meta(slice_config(config, 0, 1))  # one block is enough to see the structure
    base = model.base_model
    base_model_attr = model.base_model_prefix
    children = dict(base.named_children())
    model_type = config.model_type

    block_lists = [name for name, child in children.items() if isinstance(child, nn.ModuleList)]
    if len(block_lists) != 1:
        raise UnsupportedModelError(
            f"{model_type}: expected one list of decoder blocks in {type(base).__name__}, found {block_lists or 'none'}"
        )
    blocks_attr = block_lists[0]
    embedding_attr = _attr_of(children, base.get_input_embeddings(), f"{model_type}: input embeddings")
    final_norm_attr = _first_present(children, FINAL_NORM_NAMES, f"{model_type}: final norm")
    position_embedding_attr = _first_present(children, POSITION_EMBEDDING_NAMES)
    embedding_norm_attr = _first_present(children, EMBEDDING_NORM_NAMES)
    placed = {blocks_attr, embedding_attr, final_norm_attr, position_embedding_attr, embedding_norm_attr}
    unplaced = [name for name, child in children.items() if name not in placed and _has_weights(child)]
    if unplaced:
        raise UnsupportedModelError(
            f"{model_type}: {type(base).__name__} has parts with weights that blockswarm cannot place "
            f"before or after the blocks: {', '.join(unplaced)}"
        )
    lm_head_attr = _attr_of(dict(model.named_children()), model.get_output_embeddings(), f"{model_type}: LM head")
    canonical = _canonical_names(model, tensor_names)
    tensor_names = list(canonical)

    prefix = f"{base_model_attr}."
    if not any(name.startswith(f"{prefix}{blocks_attr}.0.") for name in tensor_names):
        prefix = ""
        if not any(name.startswith(f"{blocks_attr}.0.") for name in tensor_names):
            raise UnsupportedModelError(
                f"{model_type}: the checkpoint has no tensors of block 0 "
                f"(looked for '{base_model_attr}.{blocks_attr}.0.*' and '{blocks_attr}.0.*')"
            )
    head_in_checkpoint = f"{lm_head_attr}.weight" in tensor_names
    tie = bool(getattr(config.get_text_config(), "tie_word_embeddings", False)) or not head_in_checkpoint
    return ModelLayout(
        model_type=model_type,
        num_blocks=num_blocks,
        causal_lm_class=causal_lm_class,
        base_model_attr=base_model_attr,
        checkpoint_prefix=prefix,
        blocks_attr=blocks_attr,
        embedding_attr=embedding_attr,
        position_embedding_attr=position_embedding_attr,
        embedding_norm_attr=embedding_norm_attr,
        final_norm_attr=final_norm_attr,
        lm_head_attr=lm_head_attr,
        tie_word_embeddings=tie,
        tensor_names=canonical,
    )


def load_config(config_dir: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(config_dir)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{config_dir}: transformers cannot read this config: {e}") from e


def _causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{config.model_type} is an encoder-decoder model; blockswarm runs decoder-only LMs"
        )
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UnsupportedModelError(
            f"{config.model_type} has no causal-LM class in transformers; blockswarm runs decoder-only causal LMs"
        ) from None


def _canonical_names(model: PreTrainedModel, stored_names: list[str]) -> dict[str, str]:
    """Apply transformers' own checkpoint renamings (e.g. gpt_neox `embed_out` -> `lm_head`) to stored names."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    canonical: dict[str, str] = {}
    for stored in stored_names:
        name, converted_by = rename_source_key(stored, renamings, converters)
        if converted_by is not None:
            raise UnsupportedModelError(
                f"{model.config.model_type}: checkpoint tensor {stored!r} must be converted ({converted_by!r}) "
                "before use, which block slicing does not support yet"
            )
        canonical[name] = stored
    return canonical


def _attr_of(children: dict[str, nn.Module], module: nn.Module | None, what: str) -> str:
    for name, child in children.items():
        if child is module:
            return name
    raise UnsupportedModelError(f"{what} not found as a direct child module")


def _first_present(children: dict[str, nn.Module], names: tuple[str, ...], required: str | None = None) -> str | None:
    for name in names:
        if isinstance(children.get(name), nn.Module):
            return name
    if required is not None:
        raise UnsupportedModelError(f"{required} not found (looked for {', '.join(names)})")
    return None


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or bool(module.state_dict())
