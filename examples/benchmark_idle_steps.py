"""What waiting between steps costs a peer: the same decode step of one session, run back to back, after sleeping
`--idle-ms`, and after busy-waiting as long. A peer of a route waits that long between its steps (the other spans
and the client's LM head run meanwhile); the local model runs its blocks back to back. On this project's 2-core Intel
Xeon VM, blocks 0:4 of the 58M model took 3.6 to 4.7 ms back to back, 4.8 to 6.3 ms after sleeping 12 ms and 4.2
to 6.3 ms after busy-waiting 12 ms (5 rounds): the wait costs the step about as much whether the CPU sleeps or
not, so what costs is the time itself, likeliest the machine's other work taking the caches meanwhile.

    .venv/bin/python examples/benchmark_idle_steps.py [MODEL] [--blocks 0:4] [--idle-ms 12] [--rounds 5]

MODEL defaults to a seeded random 58M Llama (`make_random_model.py`'s 58m shape). Each round gives the median of
64 steps of each kind, the kinds taken in turns within a round.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchmark_peer_steps import load_benchmark_slice, prefilled  # this folder: the scripts' own

from swarm.models import BlockSlice

STEPS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--blocks", default="0:4")
    parser.add_argument("--idle-ms", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    block_slice = load_benchmark_slice(args.model, args.blocks)
    idle = args.idle_ms / 1000
    waits: dict[str, Callable[[], None]] = {
        "back to back": lambda: None,
        f"after sleeping {args.idle_ms:g} ms": lambda: time.sleep(idle),
        f"after busy-waiting {args.idle_ms:g} ms": lambda: busy_wait(idle),
    }
    print(f"blocks {block_slice.start}:{block_slice.end}, one thread; a decode step's median over {STEPS} steps, in ms")
    with torch.inference_mode():
        for round_number in range(1, args.rounds + 1):
            medians = {name: median_step_ms(block_slice, wait) for name, wait in waits.items()}
            print(f"round {round_number}: " + ", ".join(f"{name} {ms:.2f}" for name, ms in medians.items()))


def median_step_ms(block_slice: BlockSlice, wait: Callable[[], None]) -> float:
    cache = prefilled(block_slice, block_slice.new_cache(max_length=256), 16)
    times = []
    for _ in range(STEPS):
        wait()
        began = time.perf_counter()
        block_slice(torch.randn(1, 1, block_slice.hidden_size), cache=cache, position=cache.get_seq_length())
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def busy_wait(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


if __name__ == "__main__":
    main()
