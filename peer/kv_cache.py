"""Admission control for inference sessions: the peer's KV cache is bounded by a budget of tokens.

A session reserves `batch_size * max_length` token positions for the whole hosted span when it opens and
returns them when it closes, so the total KV memory never exceeds `--cache-tokens` worth, and a session
that does not fit is refused up front with `CacheFullError` instead of running the peer out of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from swarm.errors import CacheFullError


@dataclass(frozen=True, slots=True)
class KVCacheStatistics:
    tokens_limit: int
    tokens_used: int
    sessions_open: int
    sessions_total: int
    rejections_total: int

    @property
    def tokens_left(self) -> int:
        return self.tokens_limit - self.tokens_used


class KVCacheBudget:
    """Counts reserved KV-cache tokens; one event loop owns it, so no locking is needed."""

    def __init__(self, tokens_limit: int):
        if tokens_limit <= 0:
            raise ValueError("the KV-cache budget must be positive")
        self.tokens_limit = tokens_limit
        self._used = 0
        self._open = 0
        self._total = 0
        self._rejections = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def reserve(self, tokens: int) -> Iterator[None]:
        """Hold `tokens` positions for the duration of the block, or raise `CacheFullError` at once."""
        if tokens > self.tokens_limit - self._used:
            self._rejections += 1
            raise CacheFullError(
                f"cache full: the session needs {tokens} tokens of KV cache, "
                f"this peer has {self.tokens_limit - self._used} of {self.tokens_limit} left"
            )
        self._used += tokens
        self._open += 1
        self._total += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._used -= tokens
            self._open -= 1
            if self._open == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no session holds a reservation."""
        await self._idle.wait()

    def statistics(self) -> KVCacheStatistics:
        return KVCacheStatistics(self.tokens_limit, self._used, self._open, self._total, self._rejections)
