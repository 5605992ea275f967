"""Runs the hosted blocks on the device, off the event loop.

All torch work happens in one executor thread: the event loop keeps serving streams and the DHT while a
step computes, and steps of different sessions never race on the device.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from transformers import DynamicCache

from swarm.models import BlockSlice

_R = TypeVar("_R")


class BlockRuntime:
    """Forward, backward and cached inference steps over blocks [start, end) of the hosted slice."""

    def __init__(self, block_slice: BlockSlice):
        self.block_slice = block_slice
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-runtime")
        self._sub_slices: dict[tuple[int, int], BlockSlice] = {}

    @property
    def start(self) -> int:
        return self.block_slice.start

    @property
    def end(self) -> int:
        return self.block_slice.end

    def span(self, start: int, end: int) -> BlockSlice:
        key = (start, end)
        if key not in self._sub_slices:
            self._sub_slices[key] = self.block_slice.sub_slice(start, end)
        return self._sub_slices[key]

    async def inference_step(
        self, span: BlockSlice, cache: DynamicCache, hidden_states: torch.Tensor, position: int
    ) -> torch.Tensor:
        return await self._run(_inference_step, span, cache, hidden_states, position)

    async def forward(self, span: BlockSlice, hidden_states: torch.Tensor) -> torch.Tensor:
        return await self._run(_forward, span, hidden_states)

    async def backward(self, span: BlockSlice, hidden_states: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
        return await self._run(_backward, span, hidden_states, grad_outputs)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., _R], *args: object) -> _R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))


def _inference_step(span: BlockSlice, cache: DynamicCache, hidden_states: torch.Tensor, position: int) -> torch.Tensor:
    with torch.inference_mode():
        hidden_states = hidden_states.to(device=span.device, dtype=span.dtype)
        return span(hidden_states, cache=cache, position=position).cpu()


def _forward(span: BlockSlice, hidden_states: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return span(hidden_states.to(device=span.device, dtype=span.dtype)).cpu()


def _backward(span: BlockSlice, hidden_states: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """Recompute the forward pass with gradients on and return the gradient w.r.t. the input hidden states."""
    with torch.enable_grad():
        inputs = hidden_states.to(device=span.device, dtype=span.dtype).requires_grad_(True)
        outputs = span(inputs)
        (grad_inputs,) = torch.autograd.grad(outputs, inputs, grad_outputs.to(device=span.device, dtype=span.dtype))
    return grad_inputs.cpu()
