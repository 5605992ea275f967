"""A peer's Prometheus metrics: names, help, buckets and label sets live here and nowhere else.

Two kinds of values, kept apart (vLLM's record/export split):

  * events on the hot path (one RPC answered, tokens computed, one inference step) are recorded by the handler
    with `inc()`/`observe()` on metrics pre-created with every label set, so `rate()` and absence alerts work
    from the first scrape;
  * levels other components already count (KV-cache use, sessions, announcements, state) are read at scrape time
    from a `PeerStatistics` record the peer builds from its components' `statistics()`; nothing is copied on the
    hot path and no value can go stale.

Every metric sits in the `CollectorRegistry` passed in, one per peer, so two peers in one process never collide.
No label carries a peer id, session id or address; `blockswarm_peer_info` is the one series naming the peer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

NAMESPACE = "blockswarm"

# Bounded label values. `rpc`: the stream variants of forward/backward count as forward/backward.
RPCS = ("info", "inference", "forward", "backward")
# "ok", or the kind of the `ErrorReply` the caller got (swarm.protocol.ErrorKind), or "cancelled" when the caller
# went away mid-request.
STATUSES = ("ok", "bad_request", "cache_full", "unavailable", "internal", "unauthorized", "cancelled")
PHASES = ("prefill", "decode", "forward", "backward")
STEP_PHASES = ("prefill", "decode")  # inference steps
STATES = ("joining", "online", "draining", "offline")  # swarm.protocol.ServerState
DIRECTIONS = ("in", "out")
ANNOUNCE_STATUSES = ("ok", "failed")

RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class PeerStatistics:
    """Levels read at scrape time; the peer fills it from `KVCacheBudget` and `Announcer` statistics."""

    state: str  # one of STATES
    cache_tokens_used: int
    cache_tokens_limit: int
    sessions_active: int
    sessions_total: int
    cache_rejections_total: int
    announcements_ok_total: int
    announcements_failed_total: int
    last_announce_timestamp_seconds: float | None  # Unix time of the last stored announcement; None before one
    announced_throughput: float  # tokens/s this peer puts in the DHT
    dht_peers_seen: int  # peers in this peer's DHT routing table


class PeerMetrics:
    """Every metric of one peer, registered in `registry`. The handler calls the `record_*` methods."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.info = Info(
            f"{NAMESPACE}_peer", "This peer: version, model, DHT prefix, span, dtype, peer id", registry=registry
        )
        self.blocks_served = Gauge(
            f"{NAMESPACE}_peer_blocks_served", "Number of blocks this peer serves", registry=registry
        )
        self.block_start = Gauge(f"{NAMESPACE}_peer_block_start", "First block this peer serves", registry=registry)
        self.block_end = Gauge(
            f"{NAMESPACE}_peer_block_end", "One past the last block this peer serves", registry=registry
        )
        self.requests = Counter(
            f"{NAMESPACE}_rpc_requests_total", "RPCs answered, by RPC and outcome", ["rpc", "status"], registry=registry
        )
        self.duration = Histogram(
            f"{NAMESPACE}_rpc_duration_seconds",
            "Time from an RPC's arrival to its last reply (a whole session for inference)",
            ["rpc"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(f"{NAMESPACE}_rpc_in_flight", "RPCs being answered now", ["rpc"], registry=registry)
        self.tokens = Counter(
            f"{NAMESPACE}_tokens_processed_total",
            "Token positions computed through this peer's blocks (batch rows times sequence length), by phase",
            ["phase"],
            registry=registry,
        )
        self.step_duration = Histogram(
            f"{NAMESPACE}_inference_step_duration_seconds",
            "Compute time of one inference step over the requested span, by phase (prefill: more than one token)",
            ["phase"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.decode_batch_sessions = Histogram(
            f"{NAMESPACE}_decode_batch_sessions",
            "Sessions whose decode steps ran in one forward pass (1: alone); more under concurrent load",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.network_bytes = Counter(
            f"{NAMESPACE}_network_bytes_total",
            "Bytes of RPC messages received (in) and sent (out)",
            ["direction"],
            registry=registry,
        )
        for rpc in RPCS:
            self.duration.labels(rpc)
            self.in_flight.labels(rpc)
            for status in STATUSES:
                self.requests.labels(rpc, status)
        for phase in PHASES:
            self.tokens.labels(phase)
        for phase in STEP_PHASES:
            self.step_duration.labels(phase)
        for direction in DIRECTIONS:
            self.network_bytes.labels(direction)
        self._scrape_time = _ScrapeTimeCollector()
        registry.register(self._scrape_time)

    def set_peer(
        self, *, version: str, model: str, model_prefix: str, start: int, end: int, dtype: str, peer_id: str
    ) -> None:
        """What this peer is; set once at start."""
        self.info.info(
            {
                "version": version,
                "model": model,
                "model_prefix": model_prefix,
                "span": f"{start}:{end}",
                "dtype": dtype,
                "peer_id": peer_id,
            }
        )
        self.blocks_served.set(end - start)
        self.block_start.set(start)
        self.block_end.set(end)

    def set_statistics_source(self, statistics: Callable[[], PeerStatistics]) -> None:
        """`statistics` is called on every scrape, from the HTTP server's thread: it must only read counters."""
        self._scrape_time.statistics = statistics

    # The hot path: each method is a few inc()/observe() calls.

    def record_request(self, rpc: str, status: str, seconds: float, bytes_in: int, bytes_out: int) -> None:
        self.requests.labels(rpc, status).inc()
        self.duration.labels(rpc).observe(seconds)
        self.network_bytes.labels("in").inc(bytes_in)
        self.network_bytes.labels("out").inc(bytes_out)

    def record_tokens(self, phase: str, tokens: int) -> None:
        self.tokens.labels(phase).inc(tokens)

    def record_decode_batch(self, sessions: int) -> None:
        self.decode_batch_sessions.observe(sessions)

    def record_step(self, phase: str, seconds: float, tokens: int) -> None:
        """One inference step of `tokens` token positions (batch rows times sequence length)."""
        self.step_duration.labels(phase).observe(seconds)
        self.tokens.labels(phase).inc(tokens)


class _ScrapeTimeCollector(Collector):
    """Yields the levels of a `PeerStatistics` read when Prometheus scrapes, never before."""

    def __init__(self) -> None:
        self.statistics: Callable[[], PeerStatistics] | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # the names are fixed, but describing them would call `statistics` at registration

    def collect(self) -> Iterator[Metric]:
        if self.statistics is None:
            return
        stats = self.statistics()
        state = GaugeMetricFamily(
            f"{NAMESPACE}_peer_state",
            "1 for the state this peer announces in the DHT, 0 for the others",
            labels=["state"],
        )
        for name in STATES:
            state.add_metric([name], 1.0 if stats.state == name else 0.0)
        yield state
        yield GaugeMetricFamily(
            f"{NAMESPACE}_kv_cache_used_tokens",
            "KV-cache token positions reserved by open inference sessions",
            value=stats.cache_tokens_used,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_kv_cache_limit_tokens",
            "KV-cache token positions this peer may reserve in all (--cache-tokens)",
            value=stats.cache_tokens_limit,
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_kv_cache_rejections_total",
            "Inference sessions refused because the KV cache was full",
            value=stats.cache_rejections_total,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_inference_sessions_active", "Inference sessions open now", value=stats.sessions_active
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_inference_sessions_total", "Inference sessions opened", value=stats.sessions_total
        )
        announcements = CounterMetricFamily(
            f"{NAMESPACE}_dht_announcements_total", "Announcements of this peer's records to the DHT", labels=["status"]
        )
        announcements.add_metric(["ok"], stats.announcements_ok_total)
        announcements.add_metric(["failed"], stats.announcements_failed_total)
        yield announcements
        if stats.last_announce_timestamp_seconds is not None:
            yield GaugeMetricFamily(
                f"{NAMESPACE}_dht_last_announce_timestamp_seconds",
                "Unix time of the last announcement the DHT stored",
                value=stats.last_announce_timestamp_seconds,
            )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_peer_announced_throughput_tokens_per_second",
            "Decode throughput this peer announces in the DHT",
            value=stats.announced_throughput,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_dht_peers_seen",
            "Other DHT nodes in this peer's routing table, read at its last announcement",
            value=stats.dht_peers_seen,
        )


def monotonic_to_unix(monotonic_seconds: float) -> float:
    """A `time.monotonic()` reading (what asyncio's loop clock returns) as Unix time, for `_timestamp_seconds`."""
    return time.time() - (time.monotonic() - monotonic_seconds)


@contextlib.contextmanager
def serving_metrics(
    registry: CollectorRegistry, port: int | None, addr: str = "127.0.0.1"
) -> Iterator[WSGIServer | None]:
    """Serve `registry` at http://addr:port/metrics on a daemon thread while in the block (port 0: a free one;
    None: no server), and log the URL.

    Also turns off the `_created` series process-wide: they double every counter's series and nothing reads them.
    """
    if port is None:
        yield None
        return
    prometheus_client.disable_created_metrics()
    server, thread = prometheus_client.start_http_server(port, addr, registry=registry)
    host = f"[{addr}]" if ":" in addr else addr
    logger.info("Metrics at http://%s:%d/metrics", host, server.server_port)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
