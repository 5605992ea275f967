"""`LoraAdapters`: the client's LoRA adapters for every block of the model, saved in PEFT's format.

The client owns them as `nn.Parameter`s; each request carries the tensors of its span's blocks and peers
apply them for that request only (swarm/models/lora.py), returning their gradients. `save_pretrained` writes
`adapter_config.json` + `adapter_model.safetensors`, which `peft.PeftModel.from_pretrained` loads onto the
full model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig

from swarm.models import ModelLayout
from swarm.models.layout import build_on_meta, slice_config
from swarm.models.lora import find_targets
from swarm.protocol import LoraHeader


class LoraAdapters(nn.Module):
    """lora_A [rank, in] and lora_B [out, rank] for each target layer of each block; B starts at zero, as in PEFT,
    so an untrained adapter leaves the model unchanged."""

    def __init__(
        self,
        config: PretrainedConfig,
        layout: ModelLayout,
        *,
        rank: int,
        alpha: float,
        target_modules: tuple[str, ...],
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        block = getattr(build_on_meta(slice_config(config, 0, 1)).base_model, layout.blocks_attr)[0]
        targets = find_targets(block, target_modules)
        self.layout = layout
        self.rank = rank
        self.alpha = alpha
        self.target_modules = target_modules
        self.header = LoraHeader(targets=tuple(targets), scaling=alpha / rank)
        self.lora_A = nn.ParameterList()  # block-major, target-minor, like the wire layout
        self.lora_B = nn.ParameterList()
        for _ in range(layout.num_blocks):
            for linear in targets.values():
                lora_a = torch.empty(rank, linear.in_features, dtype=dtype)
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # PEFT's default initialisation
                self.lora_A.append(nn.Parameter(lora_a))
                self.lora_B.append(nn.Parameter(torch.zeros(linear.out_features, rank, dtype=dtype)))

    def tensors(self) -> list[torch.Tensor]:
        """[A, B] per target per block, in the order requests carry them."""
        return [t for pair in zip(self.lora_A, self.lora_B, strict=True) for t in pair]

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter under the names PEFT gives it on the full causal LM."""
        prefix = f"base_model.model.{self.layout.base_model_attr}.{self.layout.blocks_attr}"
        state = {}
        targets = self.header.targets
        for index, (lora_a, lora_b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            block, target = divmod(index, len(targets))
            name = f"{prefix}.{block}.{targets[target]}"
            state[f"{name}.lora_A.weight"] = lora_a.detach().cpu().contiguous()
            state[f"{name}.lora_B.weight"] = lora_b.detach().cpu().contiguous()
        return state

    def save_pretrained(self, path: str | os.PathLike[str], *, base_model_name_or_path: str = "") -> None:
        """Write the adapter as PEFT does: `adapter_config.json` and `adapter_model.safetensors` in `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "target_modules": list(self.header.targets),  # full names inside a block: matched as name suffixes
            "inference_mode": True,
        }
        (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        save_file(self.peft_state_dict(), path / "adapter_model.safetensors", metadata={"format": "pt"})
