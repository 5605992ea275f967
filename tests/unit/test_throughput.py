"""A peer's throughput bookkeeping: the on-disk cache of measurements, the network cap, and the moving average
of the decode speed real sessions got (read from the peer's own metrics)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from monitoring.peer_metrics import PeerMetrics
from peer.throughput import OBSERVED_WEIGHT, ObservedThroughput, ThroughputCache, network_tokens_per_second


def test_cache_round_trips_and_ignores_junk(tmp_path: Path) -> None:
    cache = ThroughputCache(tmp_path / "nested" / "throughput.json")
    assert cache.get("m|4x64|cpu|float32") is None
    cache.put("m|4x64|cpu|float32", 0.002)
    cache.put("other", 0.5)
    assert ThroughputCache(tmp_path / "nested" / "throughput.json").get("m|4x64|cpu|float32") == 0.002
    (tmp_path / "broken.json").write_text("{not json")
    assert ThroughputCache(tmp_path / "broken.json").get("m|4x64|cpu|float32") is None


def test_network_cap_counts_hidden_states_in_and_out() -> None:
    # 4096 bfloat16 values in and out per token: 16 KiB; 100 Mbit/s carries 12.5 MB/s
    assert network_tokens_per_second(4096, torch.bfloat16, 100.0) == pytest.approx(12.5e6 / 16384)


def test_observed_throughput_follows_decode_steps_only() -> None:
    metrics = PeerMetrics(CollectorRegistry())
    observed = ObservedThroughput(metrics.registry)
    assert observed.update(num_blocks=4) is None  # no traffic yet
    metrics.record_step("prefill", 1.0, 500)  # prefill is not decode speed
    assert observed.update(num_blocks=4) is None
    for _ in range(10):
        metrics.record_step("decode", 0.02, 1)  # 50 tokens/s through 4 blocks
    first = observed.update(num_blocks=4)
    assert first == pytest.approx(0.02 / 4)
    for _ in range(10):
        metrics.record_step("decode", 0.04, 1)  # slower now
    assert observed.update(num_blocks=4) == pytest.approx(OBSERVED_WEIGHT * 0.01 + (1 - OBSERVED_WEIGHT) * first)
    assert observed.update(num_blocks=4) == pytest.approx(OBSERVED_WEIGHT * 0.01 + (1 - OBSERVED_WEIGHT) * first)
