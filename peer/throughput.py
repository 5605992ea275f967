"""How many tokens per second this peer pushes through its hosted blocks, measured on this device."""

from __future__ import annotations

import time

import torch

from swarm.models import BlockSlice


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
