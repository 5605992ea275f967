"""Stand-ins for a peer's hosted blocks, for tests of the handler that load no model: one block of width HIDDEN
whose output is its input plus `offset`, and a cache that never grows."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

HIDDEN = 4


class FakeSpan:
    hidden_size, device, dtype, blocks = HIDDEN, torch.device("cpu"), torch.float32, ()

    def new_cache(self, max_length: int | None = None) -> SimpleNamespace:
        return SimpleNamespace(get_seq_length=lambda: 0)


class FakeRuntime:
    start, end = 0, 1

    def __init__(self, offset: float = 0.0):
        self.offset = offset

    def span(self, start: int, end: int) -> FakeSpan:
        return FakeSpan()

    async def inference_step(self, span: FakeSpan, cache: Any, hidden: torch.Tensor, *args: Any) -> torch.Tensor:
        return hidden + self.offset

    async def forward(self, span: FakeSpan, hidden: torch.Tensor, adapters: Any) -> torch.Tensor:
        return hidden + self.offset
