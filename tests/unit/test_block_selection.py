"""Block choice and rebalancing on synthetic swarms: many peers, uneven throughputs, gaps, and moves that must not
happen."""

from __future__ import annotations

import random

import pytest

from peer.block_selection import blocks_that_fit, choose_span, plan_move
from swarm.directory import RemoteSpan, SwarmView
from swarm.protocol import ServerInfo, ServerState

NUM_BLOCKS = 12


def view(*peers: tuple[str, int, int, float], states: dict[str, ServerState] | None = None) -> SwarmView:
    states = states or {}
    spans = tuple(
        RemoteSpan(name, ServerInfo(states.get(name, ServerState.ONLINE), start, end, throughput, 1000, "float32", "0"))
        for name, start, end, throughput in peers
    )
    return SwarmView("m", NUM_BLOCKS, spans)


def test_blocks_that_fit_counts_weights_and_cache_share() -> None:
    assert blocks_that_fit(1000, block_bytes=90, cache_bytes_per_block=10, num_blocks=12) == 10
    assert blocks_that_fit(10_000, block_bytes=90, cache_bytes_per_block=10, num_blocks=12) == 12  # the whole model
    assert blocks_that_fit(99, block_bytes=90, cache_bytes_per_block=10, num_blocks=12) == 0


def test_an_empty_swarm_is_tiled_left_to_right_by_peers_joining_in_turn() -> None:
    peers: list[tuple[str, int, int, float]] = []
    for name, length in [("a", 4), ("b", 4), ("c", 5)]:
        start, end = choose_span(view(*peers).block_throughputs(), length)
        peers.append((name, start, end, 10.0))
    assert [(start, end) for _, start, end, _ in peers] == [(0, 4), (4, 8), (7, 12)]
    assert min(view(*peers).block_throughputs()) > 0


def test_uncovered_blocks_win_over_weak_ones() -> None:
    swarm = view(("a", 0, 6, 1.0), ("b", 8, 12, 100.0))  # blocks 6, 7 uncovered; a is slow
    assert choose_span(swarm.block_throughputs(), 3) == (5, 8)  # both gaps plus a's weakest block


def test_the_weakest_window_is_chosen_among_uneven_throughputs() -> None:
    swarm = view(("a", 0, 4, 50.0), ("b", 4, 8, 5.0), ("c", 8, 12, 20.0), ("d", 0, 12, 10.0))
    assert choose_span(swarm.block_throughputs(), 4) == (4, 8)


def test_joining_peers_count_so_simultaneous_joiners_spread() -> None:
    swarm = view(("a", 0, 4, 0.0), states={"a": ServerState.JOINING})  # announced, not measured yet
    assert choose_span(swarm.block_throughputs(), 4) == (4, 8)


def test_draining_and_offline_peers_count_for_nothing() -> None:
    swarm = view(("a", 0, 4, 10.0), ("b", 4, 8, 10.0), states={"b": ServerState.DRAINING})
    assert swarm.block_throughputs()[4:8] == [0.0] * 4


def test_a_peer_moves_to_cover_a_gap_left_by_a_departed_peer() -> None:
    # a and d both serve 0:4; c (8:12) left
    swarm = view(("a", 0, 4, 10.0), ("b", 4, 8, 10.0), ("d", 0, 4, 10.0))
    move = plan_move(swarm, "d", (0, 4), 10.0, min_improvement=0.2)
    assert move is not None and (move.start, move.end) == (8, 12)
    assert (move.uncovered_now, move.uncovered_after) == (4, 0)


def test_a_move_that_would_uncover_a_block_never_happens() -> None:
    # d is the only peer of 4:8; 8:12 is uncovered. Moving would trade one gap for another.
    swarm = view(("a", 0, 4, 10.0), ("d", 4, 8, 10.0))
    assert plan_move(swarm, "d", (4, 8), 10.0, min_improvement=0.2) is None
    # even when it would cover more blocks than it uncovers
    swarm = view(("a", 0, 6, 10.0), ("d", 6, 7, 10.0))
    assert plan_move(swarm, "d", (6, 7), 10.0, min_improvement=0.0) is None


def test_hysteresis_small_gains_do_not_move_large_ones_do() -> None:
    # full coverage; blocks 8:12 are served at 9 tokens/s, d doubles up 0:4 at 10 tokens/s over a's 10
    swarm = view(("a", 0, 4, 10.0), ("b", 4, 8, 10.0), ("c", 8, 12, 9.0), ("d", 0, 4, 10.0))
    assert plan_move(swarm, "d", (0, 4), 10.0, min_improvement=0.2) is None  # bottleneck 9 -> 10: +11%
    swarm = view(("a", 0, 4, 10.0), ("b", 4, 8, 10.0), ("c", 8, 12, 2.0), ("d", 0, 4, 10.0))
    move = plan_move(swarm, "d", (0, 4), 10.0, min_improvement=0.2)
    assert move is not None and (move.start, move.end) == (8, 12)
    assert (move.bottleneck_now, move.bottleneck_after) == (2.0, 10.0)


def test_staying_put_when_already_in_the_best_place() -> None:
    swarm = view(("a", 0, 4, 10.0), ("b", 4, 8, 10.0), ("c", 8, 12, 10.0))
    assert all(plan_move(swarm, name, span, 10.0, 0.2) is None for name, span in [("a", (0, 4)), ("c", (8, 12))])


@pytest.mark.parametrize("seed", range(20))
def test_random_swarms_moves_never_lower_coverage_or_the_bottleneck(seed: int) -> None:
    rng = random.Random(seed)
    peers = []
    for index in range(rng.randint(2, 10)):
        length = rng.randint(1, 6)
        start = rng.randint(0, NUM_BLOCKS - length)
        peers.append((f"p{index}", start, start + length, rng.uniform(1.0, 100.0)))
    swarm = view(*peers)
    for name, start, end, throughput in peers:
        move = plan_move(swarm, name, (start, end), throughput, min_improvement=0.1)
        if move is None:
            continue
        others = swarm.block_throughputs(exclude=name)
        before = [v + throughput * (start <= i < end) for i, v in enumerate(others)]
        after = [v + throughput * (move.start <= i < move.end) for i, v in enumerate(others)]
        assert all(not (b > 0 and a == 0) for b, a in zip(before, after, strict=True))
        assert after.count(0.0) < before.count(0.0) or min(after) > min(before) * 1.1
