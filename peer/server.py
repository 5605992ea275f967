"""A peer's lifecycle and composition root: join the DHT, load blocks, serve, leave cleanly.

The hivemind DHT is created before the event loop starts (it forks a process that runs `p2pd`) and is always
shut down on the way out, so no `p2pd` is orphaned, whether the peer stops on SIGTERM, SIGINT or an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import hivemind
import torch
from prometheus_client import CollectorRegistry
from tqdm import tqdm

import swarm
from monitoring.peer_metrics import PeerMetrics, PeerStatistics, monotonic_to_unix, serving_metrics
from peer.announcer import Announcer
from peer.config import PeerConfig
from peer.handler import BlockHandler, HandlerLimits
from peer.kv_cache import KVCacheBudget
from peer.runtime import BlockRuntime
from peer.throughput import measure_decode_throughput
from swarm.dht import start_dht
from swarm.logs import short_id
from swarm.models import ModelSource, load_block_slice, resolve_dtype
from swarm.protocol import PROTOCOL_VERSION, ModelRecord, PeerInfo, ServerInfo, ServerState, model_prefix_for

logger = logging.getLogger(__name__)

OFFLINE_ANNOUNCE_TIMEOUT_SECONDS = 3.0  # on the way out; if the DHT is already gone, the records simply expire


def run_peer(config: PeerConfig) -> None:
    """Serve until SIGINT or SIGTERM; blocks the calling thread."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    source = ModelSource.open(config.model, revision=config.revision)  # fail fast on a bad model or range ...
    source.layout.check_range(config.start, config.end)
    dtype = resolve_dtype(config.dtype, config.device)  # ... or dtype, before any process starts
    dht = start_dht(
        config.initial_peers,
        host_maddrs=list(config.host_maddrs),
        announce_maddrs=list(config.announce_maddrs) or None,
        identity_path=config.identity_path,
        client_mode=False,
    )
    try:
        asyncio.run(Peer(config, source, dtype, dht).serve())
    finally:
        dht.shutdown()


class Peer:
    """One peer serving blocks [start, end) of one model."""

    def __init__(self, config: PeerConfig, source: ModelSource, dtype: torch.dtype, dht: hivemind.DHT):
        self.config = config
        self.source = source
        self.dtype = dtype
        self.dtype_name = str(dtype).removeprefix("torch.")  # as announced and logged: "float32", "bfloat16"
        self.dht = dht
        self.model_prefix = config.model_prefix or model_prefix_for(config.model)
        self.state = ServerState.JOINING
        self.throughput = 0.0
        self.budget = KVCacheBudget(config.cache_tokens)
        self.announcer = Announcer(
            dht,
            self.model_prefix,
            ModelRecord(name=config.model, num_blocks=source.layout.num_blocks),
            self.server_info,
            config.update_period,
        )
        self.metrics = PeerMetrics(CollectorRegistry())
        self.metrics.set_peer(
            version=swarm.__version__, model=config.model, model_prefix=self.model_prefix, start=config.start,
            end=config.end, dtype=self.dtype_name, peer_id=dht.peer_id.to_base58(),
        )  # fmt: skip
        self.metrics.set_statistics_source(self.statistics)

    def statistics(self) -> PeerStatistics:
        """What a scrape reads; called from the metrics server's thread, so it only reads counters."""
        cache, announcer = self.budget.statistics(), self.announcer.statistics()
        last = announcer.last_success_monotonic
        return PeerStatistics(
            state=self.state.value,
            cache_tokens_used=cache.tokens_used,
            cache_tokens_limit=cache.tokens_limit,
            sessions_active=cache.sessions_open,
            sessions_total=cache.sessions_total,
            cache_rejections_total=cache.rejections_total,
            announcements_ok_total=announcer.successes_total,
            announcements_failed_total=announcer.failures_total,
            last_announce_timestamp_seconds=None if last is None else monotonic_to_unix(last),
            announced_throughput=self.throughput,
            dht_peers_seen=announcer.dht_peers_seen,
        )

    def server_info(self) -> ServerInfo:
        return ServerInfo(
            state=self.state,
            start=self.config.start,
            end=self.config.end,
            throughput=self.throughput,
            cache_tokens_left=self.budget.statistics().tokens_left,
            dtype=self.dtype_name,
            version=swarm.__version__,
            protocol_version=PROTOCOL_VERSION,
            public_name=self.config.public_name,
            inference_max_length=self.config.inference_max_length,
            max_batch_size=self.config.max_batch_size,
        )

    def peer_info(self) -> PeerInfo:
        return PeerInfo(
            version=swarm.__version__,
            protocol_version=PROTOCOL_VERSION,
            model=self.config.model,
            start=self.config.start,
            end=self.config.end,
            dtype=self.dtype_name,
            hidden_size=self.source.config.hidden_size,
            cache_tokens_left=self.budget.statistics().tokens_left,
            inference_max_length=self.config.inference_max_length,
            max_batch_size=self.config.max_batch_size,
        )

    async def serve(self) -> None:
        stop, hurry = asyncio.Event(), asyncio.Event()  # first signal: drain and leave; second: leave now

        def on_signal() -> None:
            (hurry if stop.is_set() else stop).set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        config = self.config
        for maddr in self.dht.get_visible_maddrs():
            logger.info("Peer %s reachable at: --initial-peers %s", short_id(self.dht.peer_id), maddr)
        # from before loading, so that scrapes show the peer JOINING
        with serving_metrics(self.metrics.registry, config.metrics_port, config.metrics_addr):
            await self._serve(stop, hurry)

    async def _serve(self, stop: asyncio.Event, hurry: asyncio.Event) -> None:
        config = self.config
        await self.announcer.announce_now()  # JOINING: monitors see the peer while it loads
        block_slice = await asyncio.to_thread(self._load_blocks)
        self.throughput = await asyncio.to_thread(measure_decode_throughput, block_slice)
        runtime = BlockRuntime(block_slice)
        limits = HandlerLimits(config.inference_max_length, config.max_batch_size, config.session_idle_timeout)
        handler = BlockHandler(
            runtime, self.budget, limits, self.peer_info, lambda: self.state.routable, metrics=self.metrics
        )
        p2p = await self.dht.replicate_p2p()
        await handler.add_p2p_handlers(p2p)
        self.state = ServerState.ONLINE
        await self.announcer.announce_now()  # "Serving" below means: routable now
        announcing = asyncio.create_task(self.announcer.run(first_delay=config.update_period), name="announcer")
        logger.info(
            "Serving blocks %d:%d of %s (prefix %s) on %s in %s, %.1f tokens/s",
            config.start, config.end, config.model, self.model_prefix, config.device,
            self.dtype_name, self.throughput,
        )  # fmt: skip
        try:
            await stop.wait()
            await self._drain(hurry)
        finally:
            logger.info("Shutting down: announcing blocks %d:%d offline", config.start, config.end)
            announcing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await announcing
            self.state = ServerState.OFFLINE
            await self.announcer.announce_now(timeout=OFFLINE_ANNOUNCE_TIMEOUT_SECONDS)
            runtime.close()

    async def _drain(self, hurry: asyncio.Event) -> None:
        """Leave gracefully: announce DRAINING so routes avoid this peer, refuse new sessions, and let open ones
        finish for up to --drain-timeout seconds (a second signal ends the wait)."""
        open_sessions = self.budget.statistics().sessions_open
        if open_sessions == 0 or self.config.drain_timeout <= 0:
            return
        self.state = ServerState.DRAINING
        await self.announcer.announce_now()
        logger.info(
            "Draining: %d open session(s) may finish within %.0f s; no new sessions (signal again to leave now)",
            open_sessions, self.config.drain_timeout,
        )  # fmt: skip
        idle = asyncio.create_task(self.budget.wait_idle())
        hurried = asyncio.create_task(hurry.wait())
        done, pending = await asyncio.wait(
            {idle, hurried}, timeout=self.config.drain_timeout, return_when="FIRST_COMPLETED"
        )
        for task in pending:
            task.cancel()
        if idle not in done:
            logger.warning("Leaving with %d session(s) still open", self.budget.statistics().sessions_open)

    def _load_blocks(self):
        config = self.config
        with tqdm(
            total=config.end - config.start, desc=f"Loading blocks {config.start}:{config.end}", unit="block",
            file=sys.stderr, disable=None,
        ) as progress:  # fmt: skip
            return load_block_slice(
                self.source, config.start, config.end, dtype=self.dtype, device=config.device,
                on_block_read=lambda _: progress.update(1),
            )  # fmt: skip
