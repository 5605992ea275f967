"""The KV-cache budget admits sessions up to its limit, refuses the rest with CacheFullError, and frees on close."""

from __future__ import annotations

import pytest

from peer.kv_cache import KVCacheBudget
from swarm.errors import CacheFullError


def test_reservations_are_bounded_and_released() -> None:
    budget = KVCacheBudget(100)
    with budget.reserve(60):
        assert budget.statistics().tokens_left == 40
        with pytest.raises(CacheFullError, match=r"needs 50 tokens.*40 of 100 left"):
            with budget.reserve(50):
                pass
        with budget.reserve(40):
            assert budget.statistics().tokens_left == 0
    stats = budget.statistics()
    assert (stats.tokens_used, stats.sessions_open, stats.sessions_total, stats.rejections_total) == (0, 0, 2, 1)


def test_a_failing_session_returns_its_tokens() -> None:
    budget = KVCacheBudget(10)
    with pytest.raises(RuntimeError), budget.reserve(10):
        raise RuntimeError("session broke")
    assert budget.statistics().tokens_left == 10
