"""Route choice: a chain of peer spans that covers blocks [start, end), as a pure function of a `SwarmView`.

Shortest path over block boundaries: an edge i -> j through peer p exists when p serves blocks [i, j); it costs
p's measured round-trip latency, plus its compute time for j - i blocks (from its announced throughput), plus
a fixed per-hop overhead so shorter chains win ties. Random noise on each peer's cost spreads sessions over
replicas of similar quality.

Two modes. Inference (the default) minimises latency: every token crosses the whole chain, so round trips
dominate. Training calls (`spread_load=True`) are large batches where compute dominates and many trainers share
the swarm: each peer's cost is its compute time times an Exp(1) draw, so among replicas of the same blocks a
peer is chosen with probability proportional to its throughput (the minimum of independent exponentials with
rates r_i falls on i with probability r_i / sum r).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from swarm.directory import RemoteSpan, SwarmView
from swarm.errors import CacheFullError, MissingBlocksError
from swarm.logs import short_id

HOP_OVERHEAD_SECONDS = 0.002  # serialization + stream bookkeeping per hop, measured on loopback (about 1-2 ms)
UNKNOWN_LATENCY_SECONDS = 0.05  # for peers not pinged yet: assume a typical WAN round trip
LATENCY_FLOOR_SECONDS = 0.005  # below this one probe's jitter (LAN, loopback, a busy host) exceeds the value
# Each peer's cost is multiplied by a random factor in [1, 1 + COST_NOISE) per route: replicas whose costs are within
# 1.5x of each other (one latency probe on a LAN varies that much) share sessions, and a peer at least twice as
# costly as another is never preferred to it.
COST_NOISE = 0.5


@dataclass(frozen=True, slots=True)
class RouteSpan:
    """Blocks [start, end) run by one peer."""

    peer_id: str
    start: int
    end: int
    dtype: str = "float32"  # the peer's compute dtype, as announced: hidden states are sent in it

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Route:
    spans: tuple[RouteSpan, ...]

    @property
    def start(self) -> int:
        return self.spans[0].start

    @property
    def end(self) -> int:
        return self.spans[-1].end

    def describe(self) -> str:
        return " => ".join(f"{s.start}:{s.end} via {short_id(s.peer_id)}" for s in self.spans)


def choose_route(
    view: SwarmView,
    start: int,
    end: int,
    *,
    latencies: Mapping[str, float] | None = None,
    banned: Collection[str] = (),
    min_cache_tokens: int = 0,
    rng: random.Random | None = None,
    spread_load: bool = False,
    trusted: Collection[str] = (),
) -> Route:
    """The cheapest chain of spans over blocks [start, end). With `trusted` peer ids, the span that runs the
    model's first block and the one that runs its last block must be theirs (what those two peers see is close
    to the text itself; see the README's privacy notes).

    Raises `CacheFullError` if peers cover the blocks but too few have `min_cache_tokens` free, and
    `MissingBlocksError` naming the blocks that no usable peer serves.
    """
    latencies = latencies or {}
    rng = rng or random.Random()
    candidates = [
        span
        for span in view.spans
        if span.info.state.routable
        and span.peer_id not in banned
        and span.info.cache_tokens_left >= min_cache_tokens
        and span.start < end
        and span.end > start
    ]
    if spread_load:
        noise = {span.peer_id: rng.expovariate(1.0) for span in candidates}
    else:
        noise = {span.peer_id: 1.0 + rng.random() * COST_NOISE for span in candidates}
    best_cost = {start: 0.0}
    previous: dict[int, tuple[int, RemoteSpan]] = {}
    queue = [(0.0, start)]
    while queue:
        cost, position = heapq.heappop(queue)
        if position == end:
            break
        if cost > best_cost.get(position, float("inf")):
            continue
        for span in candidates:
            if not span.start <= position < span.end:
                continue
            untrusted = bool(trusted) and span.peer_id not in trusted
            if untrusted and position == 0:
                continue
            for stop in range(position + 1, min(span.end, end) + 1):
                if untrusted and stop == view.num_blocks:
                    continue
                if spread_load:  # the overhead stays out of the draw, or it would skew the proportions
                    step_cost = _compute_seconds(span, stop - position) * noise[span.peer_id] + HOP_OVERHEAD_SECONDS
                else:
                    step_cost = _hop_cost(span, stop - position, latencies) * noise[span.peer_id]
                if cost + step_cost < best_cost.get(stop, float("inf")):
                    best_cost[stop] = cost + step_cost
                    previous[stop] = (position, span)
                    heapq.heappush(queue, (cost + step_cost, stop))
    if end not in best_cost:
        if min_cache_tokens > 0:
            without_cache = [s for s in view.spans if s.info.state.routable and s.peer_id not in banned]
            uncovered_for_cache = set(_uncovered(candidates, start, end)) - set(_uncovered(without_cache, start, end))
            if uncovered_for_cache:
                raise CacheFullError(
                    f"cache full: no peer serving blocks {min(uncovered_for_cache)}:{max(uncovered_for_cache) + 1} "
                    f"has {min_cache_tokens} tokens of KV cache free; try a smaller max_length or batch, or later"
                )
        if trusted:
            trusted_spans = [span for span in candidates if span.peer_id in trusted]
            ends = sorted({0, view.num_blocks - 1} & set(range(start, end)))
            if untrusted_ends := [i for i in ends if _uncovered(trusted_spans, i, i + 1)]:
                detail = " that is trusted (trusted_peers pins the first and last blocks to them)"
                raise MissingBlocksError(view.model_prefix, untrusted_ends, detail)
        missing = _uncovered(candidates, start, end)
        banned_there = {
            s.peer_id for s in view.spans if s.peer_id in banned and set(missing) & set(range(s.start, s.end))
        }
        detail = f" ({len(banned_there)} peer(s) serving them are left out after failures)" if banned_there else ""
        raise MissingBlocksError(view.model_prefix, missing, detail)
    spans: list[RouteSpan] = []
    position = end
    while position != start:
        from_position, span = previous[position]
        spans.append(RouteSpan(span.peer_id, from_position, position, span.info.dtype))
        position = from_position
    return Route(tuple(reversed(spans)))


def _hop_cost(span: RemoteSpan, num_blocks: int, latencies: Mapping[str, float]) -> float:
    latency = max(latencies.get(span.peer_id, UNKNOWN_LATENCY_SECONDS), LATENCY_FLOOR_SECONDS)
    return latency + _compute_seconds(span, num_blocks) + HOP_OVERHEAD_SECONDS


def _compute_seconds(span: RemoteSpan, num_blocks: int) -> float:
    throughput = span.info.throughput  # tokens/s through all of the peer's blocks
    return num_blocks / (throughput * span.info.length) if throughput > 0 else 0.0


def _uncovered(candidates: list[RemoteSpan], start: int, end: int) -> list[int]:
    return [i for i in range(start, end) if not any(s.start <= i < s.end for s in candidates)]
