"""deep-ptune on decoder blocks: per-block prompt vectors added to the first positions of each block's input.

A request's prompts are one tensor [blocks of the span, pre_seq_len, hidden], shared by every sequence of the
batch; before block i runs, `hidden[:, :pre_seq_len] += prompts[i]`. Like LoRA adapters, they belong to the
client and are applied by the peer for one request only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from swarm.errors import ProtocolError


def check_prompts(blocks: Sequence[nn.Module], prompts: torch.Tensor, hidden_states: torch.Tensor) -> None:
    """Raise `ProtocolError` unless `prompts` fits these blocks and these hidden states."""
    if prompts.dtype != hidden_states.dtype:
        raise ProtocolError(f"deep prompts are {prompts.dtype}, the hidden states are {hidden_states.dtype}")
    hidden_size, seq = hidden_states.shape[-1], hidden_states.shape[1]
    if prompts.dim() != 3 or prompts.shape[0] != len(blocks) or prompts.shape[2] != hidden_size:
        raise ProtocolError(
            f"deep prompts for {len(blocks)} block(s) must be [{len(blocks)}, pre_seq_len, {hidden_size}], "
            f"got {list(prompts.shape)}"
        )
    if not 0 < prompts.shape[1] <= seq:
        raise ProtocolError(f"deep prompts of length {prompts.shape[1]} do not fit {seq} positions")


@contextlib.contextmanager
def applied_prompts(blocks: Sequence[nn.Module], prompts: torch.Tensor, position: int = 0) -> Iterator[None]:
    """Add `prompts[i]` to the first positions of block i's input while the blocks run inside the `with`.

    With `position`, the input is an inference step whose first token sits at that position of the sequence:
    only the prompt positions it covers get their vectors (none once the step is past the prompt)."""
    handles = [
        block.register_forward_pre_hook(_prompt_hook(block_prompts[position:]), with_kwargs=True)
        for block, block_prompts in zip(blocks, prompts, strict=True)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _prompt_hook(prompts: torch.Tensor):  # type: ignore[no-untyped-def]
    def add(hidden_states: torch.Tensor) -> torch.Tensor:
        length = min(prompts.shape[0], hidden_states.shape[1])
        if length == 0:
            return hidden_states
        return torch.cat([hidden_states[:, :length] + prompts[:length], hidden_states[:, length:]], dim=1)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict]:
        if args:
            return (add(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])}

    return hook
