"""A peer's own decode cost, without the network: one session's decode step at several cache lengths, and a batch
of concurrent sessions' steps (`BlockSlice.decode_together`), attending per session where the slice does and with
the sessions' caches gathered into one, against the same steps one by one.

    .venv/bin/python examples/benchmark_peer_steps.py [MODEL] [--blocks 0:4] [--sessions 8] [--threads 1]

MODEL defaults to a seeded random 58M Llama (`make_random_model.py`'s 58m shape). Medians of 30 steps.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from make_random_model import save_random_llama  # this folder: the script's own
from transformers import DynamicCache

from swarm.models import BlockSlice, ModelSource, load_block_slice

CACHE_LENGTHS = (32, 128, 512, 1024, 2048)


def median_ms(step: Callable[[], object], repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times[3:]) * 1000


def prefilled(block_slice: BlockSlice, cache: DynamicCache, length: int) -> DynamicCache:
    block_slice(torch.randn(1, length, block_slice.hidden_size), cache=cache, position=0)
    return cache


def load_benchmark_slice(model: Path | None, blocks: str) -> BlockSlice:
    """Blocks `blocks` ("START:END") of `model`, or of a seeded random 58M Llama when none is given."""
    with tempfile.TemporaryDirectory() as scratch:
        if model is None:
            model = Path(scratch) / "llama-58m"
            save_random_llama(model, "58m")
        start, end = (int(part) for part in blocks.split(":"))
        return load_block_slice(ModelSource.open(model), start, end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--blocks", default="0:4")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    block_slice = load_benchmark_slice(args.model, args.blocks)
    print(f"blocks {block_slice.start}:{block_slice.end}, {args.threads} thread(s); medians of 30 steps")
    with torch.inference_mode():
        for length in CACHE_LENGTHS:
            growing = prefilled(block_slice, block_slice.new_cache(max_length=4096), length)
            plain = prefilled(block_slice, DynamicCache(config=block_slice.base_model.config), length)
            caches = [prefilled(block_slice, block_slice.new_cache(4096), length + i) for i in range(args.sessions)]
            together = median_ms(functools.partial(decode_batched, block_slice, caches))
            per_session, block_slice._per_session_attention = block_slice._per_session_attention, False
            gathered = median_ms(functools.partial(decode_batched, block_slice, caches))
            block_slice._per_session_attention = per_session
            alone = median_ms(functools.partial(decode_each, block_slice, caches))
            ours = median_ms(functools.partial(decode_each, block_slice, [growing]))
            theirs = median_ms(functools.partial(decode_each, block_slice, [plain]))
            way = "attending per session" if block_slice.attends_per_session else "gathered"
            print(
                f"{length:5d} cached tokens: one step {ours:.2f} ms (transformers' DynamicCache {theirs:.2f} ms); "
                f"{args.sessions} sessions one by one {alone:.2f} ms, batched {way} {together:.2f} ms "
                f"({alone / together:.2f}x), batched with the caches gathered {gathered:.2f} ms "
                f"({alone / gathered:.2f}x)"
            )


def decode_each(block_slice: BlockSlice, caches: list[DynamicCache]) -> None:
    for cache in caches:
        block_slice(torch.randn(1, 1, block_slice.hidden_size), cache=cache, position=cache.get_seq_length())


def decode_batched(block_slice: BlockSlice, caches: list[DynamicCache]) -> None:
    block_slice.decode_together([(torch.randn(1, 1, block_slice.hidden_size), cache) for cache in caches])


if __name__ == "__main__":
    main()
