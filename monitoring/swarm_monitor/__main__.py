"""swarm-monitor: crawl a swarm's DHT every --period seconds and serve what it found over HTTP.

    swarm-monitor --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/Qm... --port 9700

serves http://127.0.0.1:9700/ (coverage page), /api/v1/state (JSON) and /metrics (Prometheus). A crawl that fails
or times out is counted and logged; the last good snapshot stays on display, and the "monitor stale" alert fires
when the last success gets old. SIGINT/SIGTERM stop it with the DHT (and its p2pd) shut down. Exit code 2:
unusable settings; 1: could not join the swarm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import configargparse
import prometheus_client
from hivemind import DHT
from hivemind.utils.multiaddr import Multiaddr
from prometheus_client import CollectorRegistry

import swarm
from monitoring.swarm_monitor.crawler import crawl
from monitoring.swarm_monitor.metrics import MonitorMetrics
from monitoring.swarm_monitor.state import SwarmSnapshot
from monitoring.swarm_monitor.web import MonitorServer
from swarm.command_line import command_parser
from swarm.dht import start_dht
from swarm.errors import ConfigError
from swarm.logs import setup_logging
from swarm.swarm_key import KeyedP2P, SwarmKey

logger = logging.getLogger(__name__)

SERVING_LINE = "Monitor at http://{host}:{port}/"  # tests and scripts wait for this line
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 9700
DEFAULT_PERIOD = 15.0  # seconds between crawls
DEFAULT_PING_TIMEOUT = 3.0  # seconds a peer or bootstrap node may take to answer a ping


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    initial_peers: tuple[str, ...]
    models: tuple[str, ...] = ()  # prefixes or names; empty: every model the DHT lists
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    period: float = DEFAULT_PERIOD
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    swarm_key: SwarmKey | None = None  # a private swarm's key (swarm/swarm_key.py)

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise ConfigError("--initial-peers is required: the multiaddr(s) swarm-dht printed")
        for address in self.initial_peers:
            try:
                Multiaddr(address).value_for_protocol("p2p")
            except Exception as e:
                raise ConfigError(f"{address!r} is not a multiaddr ending in /p2p/PEER_ID: {e}") from e
        if self.period <= 0 or self.ping_timeout <= 0:
            raise ConfigError("--period and --ping-timeout must be positive")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be 0-65535, got {self.port}")


class SwarmMonitor:
    """Holds the last snapshot; the web server and the metrics read it, the crawl loop replaces it."""

    def __init__(self, config: MonitorConfig, dht: DHT):
        self.config = config
        self.dht = dht
        self.snapshot: SwarmSnapshot | None = None
        self.registry = CollectorRegistry()
        self.metrics = MonitorMetrics(self.registry, swarm.__version__, lambda: self.snapshot)

    async def run(self, stop: asyncio.Event) -> None:
        p2p = await self.dht.replicate_p2p()
        if self.config.swarm_key is not None:
            p2p = KeyedP2P(p2p, self.config.swarm_key)  # peers of a private swarm answer members only
        while not stop.is_set():
            began = time.monotonic()
            try:
                # a crawl may not outlive its period: the next one starts afresh instead of piling up
                snapshot = await asyncio.wait_for(
                    crawl(self.dht, p2p, self.config.initial_peers, self.config.models, self.config.ping_timeout),
                    timeout=max(self.config.period, 2 * self.config.ping_timeout),
                )
            except Exception as e:
                logger.warning("Crawl failed (%s: %s); showing the last good one", type(e).__name__, e)
                self.metrics.record_crawl(None)
            else:
                self.snapshot = snapshot
                self.metrics.record_crawl(snapshot)
                logger.debug("Crawled %d model(s) in %.2f s", len(snapshot.models), snapshot.crawl_seconds)
            remaining = self.config.period - (time.monotonic() - began)
            with contextlib.suppress(asyncio.TimeoutError):  # the period is over (TimeoutError only from 3.11 on)
                await asyncio.wait_for(stop.wait(), timeout=max(remaining, 0.0))


def build_parser() -> configargparse.ArgumentParser:
    parser = command_parser(
        "swarm-monitor",
        "Crawl a blockswarm swarm's DHT and serve its coverage as a web page, JSON and Prometheus metrics.",
    )
    add = parser.add_argument
    add("--initial-peers", "--initial_peers", nargs="+", required=True, help="multiaddrs of bootstrap nodes")
    add("--models", nargs="+", default=[], help="model names or DHT prefixes to show (default: every model announced)")
    add("--host", default=DEFAULT_HOST, help="address the web server listens on")
    add("--port", type=int, default=DEFAULT_PORT, help="port of the web server (0: any free port)")
    add("--period", type=float, default=DEFAULT_PERIOD, help="seconds between crawls")
    add("--ping-timeout", "--ping_timeout", type=float, default=DEFAULT_PING_TIMEOUT,
        help="seconds a peer may take to answer a ping before it shows as unreachable")  # fmt: skip
    add("--swarm-key", "--swarm_key", metavar="FILE", help="key file of a private swarm (`swarm new-key FILE`)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = MonitorConfig(
            initial_peers=tuple(args.initial_peers),
            models=tuple(args.models),
            host=args.host,
            port=args.port,
            period=args.period,
            ping_timeout=args.ping_timeout,
            swarm_key=None if args.swarm_key is None else SwarmKey.load(args.swarm_key),
        )
    except ConfigError as e:
        parser.error(str(e))
    try:
        dht = start_dht(
            config.initial_peers, client_mode=True, wait_timeout=config.ping_timeout, swarm_key=config.swarm_key
        )
    except ConfigError as e:
        logger.error("%s", e)
        sys.exit(1)
    try:
        asyncio.run(_serve(config, dht))
    finally:
        dht.shutdown()


async def _serve(config: MonitorConfig, dht: DHT) -> None:
    monitor = SwarmMonitor(config, dht)
    try:
        server = MonitorServer(config.host, config.port, monitor.registry, lambda: monitor.snapshot)
    except OSError as e:
        raise SystemExit(f"cannot listen on {config.host}:{config.port}: {e}") from e
    prometheus_client.disable_created_metrics()  # the `_created` series double every counter; nothing reads them
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    host = f"[{config.host}]" if ":" in config.host else config.host
    logger.info(SERVING_LINE.format(host=host, port=server.port))
    try:
        await monitor.run(stop)
    finally:
        server.close()
        logger.info("Monitor stopped")


if __name__ == "__main__":
    main()
