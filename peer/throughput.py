"""How many tokens per second this peer pushes through its hosted blocks: measured on this device at start (or
read from an on-disk cache of earlier measurements), capped by a network estimate, then followed from real traffic.

The compute figure is kept per block (seconds per token per block), so a peer that moves to a span of another
length knows its speed there without measuring again. The network estimate needs no internet: hidden states of
`hidden_size` values go in and out per token over `--network-bandwidth` Mbit/s (a setting; 100 by default).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from swarm.models import BlockSlice

logger = logging.getLogger(__name__)

CACHE_PATH_ENV = "BLOCKSWARM_THROUGHPUT_CACHE"
DEFAULT_CACHE_PATH = Path("~/.cache/blockswarm/throughput.json")
OBSERVED_WEIGHT = 0.3  # weight of the newest period's observed decode speed in the moving average


def measure_decode_throughput(
    block_slice: BlockSlice, steps: int = 8, repeats: int = 5, prefix_tokens: int = 16
) -> float:
    """Tokens/s of one-token decode steps through the whole slice after a short prefill, as a session runs them.

    The best of `repeats` runs: peers often start together on one host, and contention only ever slows a run
    down, so the fastest run is the closest to what the device can do.
    """
    hidden = torch.randn(1, prefix_tokens, block_slice.hidden_size, dtype=block_slice.dtype, device=block_slice.device)
    best = 0.0
    with torch.inference_mode():
        for _ in range(repeats):
            cache = block_slice.new_cache()
            block_slice(hidden, cache=cache, position=0)
            step = hidden[:, :1]
            began = time.perf_counter()
            for i in range(steps):
                block_slice(step, cache=cache, position=prefix_tokens + i)
            best = max(best, steps / max(time.perf_counter() - began, 1e-9))
    return best


def network_tokens_per_second(hidden_size: int, dtype: torch.dtype, bandwidth_mbit: float) -> float:
    """Tokens/s the link carries: each token's hidden state comes in and goes out once."""
    bytes_per_token = 2 * hidden_size * dtype.itemsize
    return bandwidth_mbit * 1e6 / 8 / bytes_per_token


class ThroughputCache:
    """Seconds per token per block, by model shape, device and dtype, in a JSON file shared by local peers."""

    def __init__(self, path: Path | None = None):
        self.path = (path or Path(os.environ.get(CACHE_PATH_ENV, DEFAULT_CACHE_PATH))).expanduser()

    def get(self, key: str) -> float | None:
        value = self._read().get(key)
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    def put(self, key: str, seconds_per_block: float) -> None:
        entries = {**self._read(), key: seconds_per_block}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(entries, indent=1, sort_keys=True))
            temporary.replace(self.path)  # atomic: peers starting together never read half a file
        except OSError as e:
            logger.warning("Could not cache the throughput measurement in %s: %s", self.path, e)

    def _read(self) -> dict[str, object]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}


class ObservedThroughput:
    """A moving average of the decode speed this peer's blocks actually delivered, from its own metrics.

    Each `update()` looks at the decode steps since the last one: tokens computed over the time spent computing
    them. Periods without decode traffic leave the average as it was.
    """

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.seconds_per_block: float | None = None
        self._last = self._totals()

    def update(self, num_blocks: int) -> float | None:
        """Fold in the traffic since the last call; the averaged seconds per token per block, None before any."""
        tokens, seconds = self._totals()
        new_tokens, new_seconds = tokens - self._last[0], seconds - self._last[1]
        self._last = (tokens, seconds)
        if new_tokens > 0 and new_seconds > 0:
            observed = new_seconds / new_tokens / num_blocks
            previous = self.seconds_per_block
            self.seconds_per_block = (
                observed if previous is None else OBSERVED_WEIGHT * observed + (1 - OBSERVED_WEIGHT) * previous
            )
        return self.seconds_per_block

    def _totals(self) -> tuple[float, float]:
        get = self.registry.get_sample_value
        tokens = get("blockswarm_tokens_processed_total", {"phase": "decode"}) or 0.0
        seconds = get("blockswarm_inference_step_duration_seconds_sum", {"phase": "decode"}) or 0.0
        return tokens, seconds
