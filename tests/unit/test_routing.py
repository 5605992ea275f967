"""Route choice on synthetic swarm views: coverage, cost, bans, cache and state filters, clear errors."""

from __future__ import annotations

import random

import pytest

from swarm.client.routing import choose_route
from swarm.directory import RemoteSpan, SwarmView
from swarm.errors import CacheFullError, MissingBlocksError
from swarm.protocol import ServerInfo, ServerState


def _span(peer: str, start: int, end: int, *, throughput: float = 100.0, cache: int = 10_000, state=ServerState.ONLINE):
    info = ServerInfo(state, start, end, throughput, cache, "float32", "0.1.0")
    return RemoteSpan(peer, info)


def _view(*spans: RemoteSpan, num_blocks: int = 12) -> SwarmView:
    return SwarmView("model", num_blocks, tuple(spans))


def _covers_contiguously(route, start: int, end: int) -> bool:
    positions = [start] + [s.end for s in route.spans]
    return (
        route.start == start
        and route.end == end
        and all(s.start == p for s, p in zip(route.spans, positions[:-1], strict=True))
    )


def test_route_covers_all_blocks_with_contiguous_spans() -> None:
    view = _view(_span("a", 0, 5), _span("b", 3, 9), _span("c", 8, 12))
    route = choose_route(view, 0, 12, rng=random.Random(0))
    assert _covers_contiguously(route, 0, 12)
    assert [s.peer_id for s in route.spans] == ["a", "b", "c"]


def test_one_peer_serving_everything_beats_a_chain() -> None:
    view = _view(_span("whole", 0, 12), _span("left", 0, 6), _span("right", 6, 12))
    latencies = {"whole": 0.01, "left": 0.01, "right": 0.01}
    for seed in range(20):
        route = choose_route(view, 0, 12, latencies=latencies, rng=random.Random(seed))
        assert [s.peer_id for s in route.spans] == ["whole"]


def test_a_much_slower_peer_is_avoided() -> None:
    view = _view(_span("near", 0, 12), _span("far", 0, 12))
    for seed in range(20):
        route = choose_route(view, 0, 12, latencies={"near": 0.01, "far": 0.5}, rng=random.Random(seed))
        assert route.spans[0].peer_id == "near"


def test_equal_replicas_share_routes() -> None:
    view = _view(_span("a", 0, 6), _span("b", 6, 12), _span("c", 6, 12))
    latencies = {"a": 0.01, "b": 0.01, "c": 0.01}
    rng = random.Random(0)
    chosen = {choose_route(view, 0, 12, latencies=latencies, rng=rng).spans[-1].peer_id for _ in range(50)}
    assert chosen == {"b", "c"}


def test_banned_offline_draining_and_joining_peers_are_skipped() -> None:
    view = _view(
        _span("banned", 0, 12),
        _span("offline", 0, 12, state=ServerState.OFFLINE),
        _span("draining", 0, 12, state=ServerState.DRAINING),
        _span("joining", 0, 12, state=ServerState.JOINING),
        _span("ok", 0, 12),
    )
    route = choose_route(view, 0, 12, banned={"banned"}, rng=random.Random(0))
    assert [s.peer_id for s in route.spans] == ["ok"]


def test_missing_blocks_are_named() -> None:
    view = _view(_span("a", 0, 4), _span("b", 6, 12))
    with pytest.raises(MissingBlocksError) as error:
        choose_route(view, 0, 12)
    assert error.value.block_indices == [4, 5]
    assert "4:6" in str(error.value) and "swarm-peer" in str(error.value)


def test_peers_without_enough_cache_give_a_cache_error_not_missing_blocks() -> None:
    view = _view(_span("a", 0, 6, cache=100), _span("b", 6, 12, cache=5000))
    with pytest.raises(CacheFullError, match="blocks 0:6"):
        choose_route(view, 0, 12, min_cache_tokens=1000)
    assert choose_route(view, 0, 12, min_cache_tokens=50).end == 12


def test_sub_range_routes() -> None:
    view = _view(_span("a", 0, 8), _span("b", 4, 12))
    route = choose_route(view, 5, 10, rng=random.Random(1))
    assert _covers_contiguously(route, 5, 10)


def test_training_routes_spread_over_replicas_in_proportion_to_throughput() -> None:
    """3:1 throughput between two replicas of the same blocks: about 3:1 of the training calls (2000 draws)."""
    view = _view(_span("fast", 0, 12, throughput=300.0), _span("slow", 0, 12, throughput=100.0))
    latencies = {"fast": 0.5, "slow": 0.001}  # latency does not matter for training: compute does
    rng = random.Random(0)
    picks = [
        choose_route(view, 0, 12, latencies=latencies, rng=rng, spread_load=True).spans[0].peer_id for _ in range(2000)
    ]
    assert picks.count("fast") / len(picks) == pytest.approx(0.75, abs=0.03)
    # inference on the same view follows latency
    assert choose_route(view, 0, 12, latencies=latencies, rng=rng).spans[0].peer_id == "slow"


def test_trusted_peers_alone_run_the_first_and_last_blocks() -> None:
    view = _view(
        _span("fast-untrusted", 0, 12),
        _span("home", 0, 4),
        _span("middle", 4, 8),
        _span("office", 8, 12),
    )
    latencies = {"fast-untrusted": 0.005, "home": 0.05, "middle": 0.05, "office": 0.05}
    for seed in range(20):
        route = choose_route(view, 0, 12, latencies=latencies, rng=random.Random(seed), trusted={"home", "office"})
        assert route.spans[0].peer_id == "home" and route.spans[-1].peer_id == "office"  # the middle: anyone
        assert choose_route(view, 4, 8, latencies=latencies, rng=random.Random(seed), trusted={"home"}).spans
    with pytest.raises(MissingBlocksError, match=r"blocks 11:12 of model have no live peer that is trusted"):
        choose_route(view, 0, 12, latencies=latencies, trusted={"home"})
