"""Which blocks a peer hosts: how many fit its memory, where the swarm is weakest, and when to move.

Pure functions of numbers and a `SwarmView`, so the choices are unit-tested on synthetic swarms.

  * `blocks_that_fit`: as many blocks as the memory budget holds with their share of the KV cache.
  * `choose_span`: the window of the swarm's per-block throughputs that is weakest, compared as sorted tuples, so
    a window with more uncovered blocks always wins, then the one with the weakest block, and so on. Ties go to
    the leftmost window, so peers joining one after another tile an empty swarm without gaps.
  * `plan_move`: where this peer would do the most good. It moves only if that uncovers no block and either
    covers blocks now uncovered, or raises the swarm's bottleneck (its weakest block's throughput) by more than
    `min_improvement` (hysteresis: no flapping between near-equal layouts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swarm.directory import SwarmView


def blocks_that_fit(memory_bytes: int, block_bytes: int, cache_bytes_per_block: int, num_blocks: int) -> int:
    """Blocks (at most `num_blocks`) whose weights and KV-cache share fit in `memory_bytes`; 0 if none does."""
    per_block = block_bytes + cache_bytes_per_block
    return max(0, min(num_blocks, memory_bytes // per_block))


def choose_span(throughputs: Sequence[float], length: int) -> tuple[int, int]:
    """The weakest window of `length` blocks: the least sorted tuple of its throughputs, leftmost among equals."""
    if not 0 < length <= len(throughputs):
        raise ValueError(f"cannot place {length} blocks in a model of {len(throughputs)}")
    start = min(range(len(throughputs) - length + 1), key=lambda i: (sorted(throughputs[i : i + length]), i))
    return start, start + length


@dataclass(frozen=True, slots=True)
class Move:
    """A planned move and why: the swarm's numbers with this peer where it is, and where it would go."""

    start: int
    end: int
    uncovered_now: int
    uncovered_after: int
    bottleneck_now: float  # throughput of the weakest block, tokens/s
    bottleneck_after: float

    def describe(self) -> str:
        if self.uncovered_after < self.uncovered_now:
            return f"uncovered blocks {self.uncovered_now} -> {self.uncovered_after}"
        return f"weakest block {self.bottleneck_now:.1f} -> {self.bottleneck_after:.1f} tokens/s"


def plan_move(
    view: SwarmView, peer_id: str, span: tuple[int, int], throughput: float, min_improvement: float
) -> Move | None:
    """Where this peer (serving `span` at `throughput`) should move, or None to stay."""
    others = view.block_throughputs(exclude=peer_id)
    start, end = span
    now = _with_peer(others, start, end, throughput)
    new_start, new_end = choose_span(others, end - start)
    if (new_start, new_end) == span:
        return None
    after = _with_peer(others, new_start, new_end, throughput)
    if any(before > 0 and moved == 0 for before, moved in zip(now, after, strict=True)):
        return None  # never uncover a block, even to cover others
    move = Move(new_start, new_end, now.count(0.0), after.count(0.0), min(now), min(after))
    if move.uncovered_after < move.uncovered_now:
        return move
    if move.uncovered_now == 0 and move.bottleneck_after > move.bottleneck_now * (1 + min_improvement):
        return move
    return None


def _with_peer(others: Sequence[float], start: int, end: int, throughput: float) -> list[float]:
    return [value + throughput if start <= i < end else value for i, value in enumerate(others)]
