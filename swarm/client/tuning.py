"""What a client trains through the swarm's frozen blocks: `TuningConfig` picks it, `SoftPrompts` holds ptune's.

Tuning modes (the blocks on the peers never change; everything trainable lives on the client):
  * "ptune": `pre_seq_len` trainable vectors prepended to every sequence's token embeddings;
  * "deep-ptune": ptune, plus `pre_seq_len` trainable vectors per block that the peers add to the first
    positions of that block's input (swarm/models/deep_prompts.py);
  * "lora":  LoRA adapters on the blocks' linear layers, sent with each request (swarm/client/lora.py);
  * None:    nothing beyond what `tune_embeddings` / `tune_head` unfreeze.
The embeddings and the LM head can be unfrozen in any mode. `DistributedModelForCausalLM.trainable_parameters()`
returns what an optimizer should update.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from swarm.errors import ConfigError

TUNING_MODES = ("ptune", "deep-ptune", "lora")
PROMPTS_FILE = "prompts.safetensors"  # trained soft prompts, as `SoftPrompts.save_pretrained` writes them


@dataclass(frozen=True, slots=True)
class TuningConfig:
    mode: str | None = None  # "ptune", "deep-ptune", "lora", or None (only the unfrozen client modules train)
    pre_seq_len: int = 16  # ptune / deep-ptune: prompt vectors prepended to each sequence
    lora_rank: int = 8  # lora: rank r of each adapter
    lora_alpha: float = 16.0  # lora: the adapter's output is scaled by lora_alpha / lora_rank, as in PEFT
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # lora: linear layers of each block, PEFT-style
    tune_embeddings: bool = False  # train the input embeddings (and learned positions / embedding norm)
    tune_head: bool = False  # train the final norm and the LM head (tied to the embeddings in some models)

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in TUNING_MODES:
            raise ConfigError(f"tuning mode {self.mode!r} is not one of {', '.join(TUNING_MODES)} (or None)")
        if self.mode in ("ptune", "deep-ptune") and self.pre_seq_len <= 0:
            raise ConfigError(f"{self.mode} needs pre_seq_len > 0")
        if self.lora_rank <= 0 or self.lora_alpha <= 0:
            raise ConfigError("lora_rank and lora_alpha must be positive")
        if isinstance(self.lora_target_modules, str) or not self.lora_target_modules:
            raise ConfigError("lora_target_modules must be a non-empty list of module names, e.g. ('q_proj', 'v_proj')")
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))


class SoftPrompts(nn.Module):
    """ptune's trainable prompt: `pre_seq_len` vectors in the token-embedding space, shared by every sequence;
    with `num_blocks`, deep-ptune's `block_prompts` [num_blocks, pre_seq_len, hidden] too, starting at zero so
    that an untrained deep prompt changes nothing."""

    def __init__(
        self,
        pre_seq_len: int,
        hidden_size: int,
        *,
        num_blocks: int = 0,
        std: float = 0.02,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(pre_seq_len, hidden_size, dtype=dtype) * std)
        self.block_prompts = (
            nn.Parameter(torch.zeros(num_blocks, pre_seq_len, hidden_size, dtype=dtype)) if num_blocks else None
        )

    @property
    def pre_seq_len(self) -> int:
        return self.prompts.shape[0]

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """`path`/prompts.safetensors: "prompts", and deep-ptune's "block_prompts"; returns the file's path."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"prompts": self.prompts.detach().cpu().contiguous()}
        if self.block_prompts is not None:
            tensors["block_prompts"] = self.block_prompts.detach().cpu().contiguous()
        save_file(tensors, path / PROMPTS_FILE, metadata={"format": "pt"})
        return path / PROMPTS_FILE

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], hidden_size: int, num_blocks: int, *, dtype: torch.dtype | None = None
    ) -> SoftPrompts:
        """Prompts saved by `save_pretrained` (or `swarm finetune --method ptune/deep-ptune`) for this model."""
        file = Path(path) / PROMPTS_FILE
        try:
            tensors = load_file(file)
        except (OSError, SafetensorError) as e:
            raise ConfigError(f"cannot read soft prompts from {file}: {e}") from e
        prompts, block_prompts = tensors.get("prompts"), tensors.get("block_prompts")
        if prompts is None or prompts.dim() != 2 or prompts.shape[1] != hidden_size:
            raise ConfigError(f"{file}: 'prompts' must be [pre_seq_len, {hidden_size}] for this model")
        if block_prompts is not None and block_prompts.shape != (num_blocks, *prompts.shape):
            raise ConfigError(
                f"{file}: 'block_prompts' must be [{num_blocks}, {prompts.shape[0]}, {hidden_size}] for this model, "
                f"got {list(block_prompts.shape)}"
            )
        soft_prompts = cls(prompts.shape[0], hidden_size, num_blocks=0 if block_prompts is None else num_blocks)
        with torch.no_grad():
            soft_prompts.prompts.copy_(prompts)
            if block_prompts is not None:
                assert soft_prompts.block_prompts is not None
                soft_prompts.block_prompts.copy_(block_prompts)
        return soft_prompts if dtype is None else soft_prompts.to(dtype)

    def prepend(self, token_vectors: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] token embeddings -> [batch, pre_seq_len + seq, hidden]."""
        prompts = self.prompts.to(token_vectors.dtype).unsqueeze(0).expand(token_vectors.shape[0], -1, -1)
        return torch.cat([prompts, token_vectors], dim=1)
