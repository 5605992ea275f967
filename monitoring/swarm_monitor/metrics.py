"""The monitor's Prometheus metrics: the swarm as of the last crawl (read at scrape time from the cached snapshot,
so a scrape never waits on the DHT) and the monitor's own health (crawl duration, outcomes, last success, pings).

Labels stay bounded: `model` is a model's DHT prefix, `block` its index zero-padded to 3 digits (so "010" sorts
after "009" in Grafana), `state` a ServerState, `bootstrap` the position in --initial-peers. No peer ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitoring.swarm_monitor.state import STATES, SwarmSnapshot

CRAWL_STATUSES = ("ok", "failed")
CRAWL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def block_label(index: int) -> str:
    return f"{index:03d}"


class MonitorMetrics:
    """Every metric of one monitor, in `registry`. The crawl loop calls `record_crawl`."""

    def __init__(self, registry: CollectorRegistry, version: str, snapshot: Callable[[], SwarmSnapshot | None]):
        self.registry = registry
        info = Gauge("blockswarm_monitor_info", "This monitor's version", ["version"], registry=registry)
        info.labels(version).set(1)
        self.crawls = Counter(
            "blockswarm_monitor_crawls_total", "Crawls of the DHT, by outcome", ["status"], registry=registry
        )
        for status in CRAWL_STATUSES:
            self.crawls.labels(status)
        self.crawl_duration = Histogram(
            "blockswarm_monitor_crawl_duration_seconds",
            "Time one successful crawl took: DHT reads and pings",
            buckets=CRAWL_BUCKETS,
            registry=registry,
        )
        self.last_success = Gauge(
            "blockswarm_monitor_last_crawl_success_timestamp_seconds",
            "Unix time of the last successful crawl (0 before the first)",
            registry=registry,
        )
        self.ping = Histogram(
            "blockswarm_monitor_peer_ping_seconds",
            "Round trip of the info RPC to each peer that answered, one sample per peer per crawl",
            buckets=PING_BUCKETS,
            registry=registry,
        )
        registry.register(_SnapshotCollector(snapshot))

    def record_crawl(self, snapshot: SwarmSnapshot | None) -> None:
        """A finished crawl; None if it failed."""
        if snapshot is None:
            self.crawls.labels("failed").inc()
            return
        self.crawls.labels("ok").inc()
        self.crawl_duration.observe(snapshot.crawl_seconds)
        self.last_success.set(snapshot.taken_at)
        for model in snapshot.models:
            for peer in model.peers:
                if peer.ping_seconds is not None:
                    self.ping.observe(peer.ping_seconds)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], SwarmSnapshot | None]):
        self.snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot()
        if snapshot is None:
            return
        models = GaugeMetricFamily("blockswarm_swarm_models_served", "Models some peer announces in the DHT")
        models.add_metric([], len(snapshot.models))
        yield models
        num_blocks = GaugeMetricFamily("blockswarm_swarm_model_blocks", "Blocks in the model", labels=["model"])
        uncovered = GaugeMetricFamily(
            "blockswarm_swarm_blocks_uncovered", "Blocks with no online peer: the model cannot run", labels=["model"]
        )
        model_peers = GaugeMetricFamily(
            "blockswarm_swarm_model_peers", "Peers announcing blocks of the model, by state", labels=["model", "state"]
        )
        block_peers = GaugeMetricFamily(
            "blockswarm_swarm_block_peers", "Peers announcing the block, by state", labels=["model", "block", "state"]
        )
        throughput = GaugeMetricFamily(
            "blockswarm_swarm_block_throughput_tokens_per_second",
            "Summed announced throughput of the block's online peers",
            labels=["model", "block"],
        )
        unreachable = GaugeMetricFamily(
            "blockswarm_swarm_peers_unreachable",
            "Peers with records that did not answer the monitor's ping",
            labels=["model"],
        )
        for model in snapshot.models:
            num_blocks.add_metric([model.prefix], model.num_blocks)
            uncovered.add_metric([model.prefix], len(model.missing_blocks))
            unreachable.add_metric([model.prefix], sum(not peer.reachable for peer in model.peers))
            for state in STATES:
                model_peers.add_metric([model.prefix, state], sum(peer.state == state for peer in model.peers))
            for block in model.blocks:
                label = block_label(block.index)
                throughput.add_metric([model.prefix, label], block.throughput)
                for state in STATES:
                    block_peers.add_metric([model.prefix, label, state], block.peers_by_state[state])
        yield from (num_blocks, uncovered, model_peers, block_peers, throughput, unreachable)
        bootstraps = GaugeMetricFamily(
            "blockswarm_monitor_bootstrap_reachable",
            "1 if the --initial-peers entry answered a DHT ping in the last crawl",
            labels=["bootstrap"],
        )
        for position, entry in enumerate(snapshot.bootstraps):
            bootstraps.add_metric([str(position)], float(entry.reachable))
        yield bootstraps
