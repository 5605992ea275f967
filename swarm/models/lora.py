"""LoRA on decoder blocks, shared by client and peer: which linear layers a target names, and how a peer
applies a caller's adapter to its blocks for one request.

The adapter belongs to the client and travels with each request; the peer never stores it. Its tensors are
block-major: for each block of the span, for each target in `LoraHeader.targets` order, `lora_A` [rank, in]
then `lora_B` [out, rank]. Each target computes `linear(x) + scaling * (x @ A.T @ B.T)`, as PEFT's unmerged
LoRA layer does, so an adapter trained through the swarm loads into `peft` unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from swarm.errors import ConfigError, ProtocolError
from swarm.protocol import LoraHeader


def find_targets(block: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The `nn.Linear` layers of one block whose name (or its last part) is in `target_modules`, in module order.

    Names are matched as PEFT matches a list of target modules: a full dotted name or its last component.
    """
    wanted = set(target_modules)
    found: dict[str, nn.Linear] = {}
    for name, module in block.named_modules():
        if name and (name in wanted or name.rsplit(".", 1)[-1] in wanted):
            if not isinstance(module, nn.Linear):
                raise ConfigError(
                    f"LoRA target {name!r} is a {type(module).__name__}; only nn.Linear layers are supported"
                )
            found[name] = module
    missing = wanted - set(found) - {name.rsplit(".", 1)[-1] for name in found}
    if missing:
        raise ConfigError(f"LoRA targets {sorted(missing)} match no layer of the block; it has {_linear_names(block)}")
    return found


def check_lora(
    blocks: Sequence[nn.Module], header: LoraHeader, tensors: Sequence[torch.Tensor], dtype: torch.dtype
) -> None:
    """Raise `ProtocolError` unless `tensors` is an adapter for exactly these blocks, in floating point `dtype`."""
    expected = 2 * len(header.targets) * len(blocks)
    if len(tensors) != expected:
        raise ProtocolError(
            f"LoRA for {len(blocks)} block(s) x {len(header.targets)} target(s) needs {expected} tensors, "
            f"got {len(tensors)}"
        )
    pairs = iter(zip(tensors[0::2], tensors[1::2], strict=True))
    for offset, block in enumerate(blocks):
        modules = dict(block.named_modules())
        for target in header.targets:
            lora_a, lora_b = next(pairs)
            linear = modules.get(target)
            if not isinstance(linear, nn.Linear):
                raise ProtocolError(f"LoRA target {target!r} is not a linear layer of these blocks")
            for name, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
                if tensor.dtype != dtype:
                    raise ProtocolError(f"LoRA {name} of {target!r} is {tensor.dtype}, the hidden states are {dtype}")
            rank = lora_a.shape[0] if lora_a.dim() == 2 else -1
            if rank <= 0 or lora_a.shape != (rank, linear.in_features) or lora_b.shape != (linear.out_features, rank):
                raise ProtocolError(
                    f"LoRA of {target!r} in block {offset} of the span must be lora_A [rank, {linear.in_features}] "
                    f"and lora_B [{linear.out_features}, rank]; got {list(lora_a.shape)} and {list(lora_b.shape)}"
                )


@contextlib.contextmanager
def applied_lora(blocks: Sequence[nn.Module], header: LoraHeader, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Add the adapter's low-rank term to the target layers' outputs while the block is run inside the `with`.

    The hooks are removed on exit, so the shared weights never change and the next request sees the plain
    blocks. Callers must run the blocks in the same thread and finish before another request runs them (the
    peer's runtime runs one job at a time).
    """
    handles = []
    pairs = iter(zip(tensors[0::2], tensors[1::2], strict=True))
    try:
        for block in blocks:
            modules = dict(block.named_modules())
            for target in header.targets:
                lora_a, lora_b = next(pairs)
                handles.append(modules[target].register_forward_hook(_lora_hook(lora_a, lora_b, header.scaling)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _lora_hook(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):  # type: ignore[no-untyped-def]
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + (inputs[0] @ lora_a.T @ lora_b.T) * scaling

    return hook


def _linear_names(block: nn.Module) -> list[str]:
    return [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]
