"""`LoraAdapters`: the client's LoRA adapters for every block of the model, saved in PEFT's format.

The client owns them as `nn.Parameter`s; each request carries the tensors of its span's blocks and peers
apply them for that request only (swarm/models/lora.py), returning their gradients. `save_pretrained` writes
`adapter_config.json` + `adapter_model.safetensors`, which `peft.PeftModel.from_pretrained` loads onto the
full model; `from_pretrained` reads such a directory back (one written here or by PEFT for the same model), for
generation through the swarm or to train further.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from swarm.errors import ConfigError
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
        use_rslora: bool = False,
    ):
        super().__init__()
        block = getattr(build_on_meta(slice_config(config, 0, 1)).base_model, layout.blocks_attr)[0]
        targets = find_targets(block, target_modules)
        self.layout = layout
        self.rank = rank
        self.alpha = alpha
        self.target_modules = target_modules
        self.use_rslora = use_rslora
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank  # as PEFT scales
        self.header = LoraHeader(targets=tuple(targets), scaling=scaling)
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
            "use_rslora": self.use_rslora,
            "target_modules": list(self.header.targets),  # full names inside a block: matched as name suffixes
            "inference_mode": True,
        }
        (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        save_file(self.peft_state_dict(), path / "adapter_model.safetensors", metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        config: PretrainedConfig,
        layout: ModelLayout,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> LoraAdapters:
        """Load a PEFT LoRA adapter directory for this model. Options that change what a LoRA layer computes beyond
        `linear(x) + scaling * B(A(x))` (DoRA, biases, per-layer ranks, ...) are refused, never ignored."""
        path = Path(path)
        try:
            adapter_config = json.loads((path / "adapter_config.json").read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read adapter_config.json: {e}") from e
        if adapter_config.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"{path}: a {adapter_config['peft_type']} adapter; only LoRA adapters are supported")
        unsupported = {
            "use_dora": adapter_config.get("use_dora", False),
            "fan_in_fan_out": adapter_config.get("fan_in_fan_out", False),
            "rank_pattern": adapter_config.get("rank_pattern") or {},
            "alpha_pattern": adapter_config.get("alpha_pattern") or {},
            "layers_to_transform": adapter_config.get("layers_to_transform"),
            "modules_to_save": adapter_config.get("modules_to_save"),
        }
        if adapter_config.get("bias", "none") != "none":
            unsupported["bias"] = adapter_config["bias"]
        if set_options := {name: value for name, value in unsupported.items() if value}:
            raise ConfigError(f"{path}: LoRA options {set_options} are not supported by the swarm's blocks")
        targets = adapter_config.get("target_modules")
        if isinstance(targets, str) or not targets:
            raise ConfigError(f"{path}: target_modules must be a list of module names, got {targets!r}")
        adapters = cls(
            config, layout, rank=int(adapter_config["r"]), alpha=float(adapter_config["lora_alpha"]),
            target_modules=tuple(targets), dtype=dtype, use_rslora=bool(adapter_config.get("use_rslora", False)),
        )  # fmt: skip
        state = _read_adapter_weights(path)
        expected = adapters.peft_state_dict()
        if missing := sorted(set(expected) - set(state)):
            raise ConfigError(f"{path}: the adapter lacks {len(missing)} tensor(s) this model needs, e.g. {missing[0]}")
        if extra := sorted(set(state) - set(expected)):
            raise ConfigError(f"{path}: the adapter has tensor(s) this model has no place for, e.g. {extra[0]}")
        with torch.no_grad():
            for name, parameter in zip(expected, adapters.tensors(), strict=True):  # both A, B per target per block
                if state[name].shape != parameter.shape:
                    raise ConfigError(
                        f"{path}: {name} is {list(state[name].shape)}, this model needs {list(parameter.shape)}"
                    )
                parameter.copy_(state[name])
        return adapters


def _read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "adapter_model.safetensors").exists():
        return load_file(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").exists():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise ConfigError(f"{path}: no adapter_model.safetensors (or adapter_model.bin)")
