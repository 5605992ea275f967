"""A peer's lifecycle and composition root: join the DHT, choose and load blocks, serve, move, leave cleanly.

The hivemind DHT is created before the event loop starts (it forks a process that runs `p2pd`) and is always
shut down on the way out, so no `p2pd` is orphaned, whether the peer stops on SIGTERM, SIGINT or an error.

Without --blocks the peer places itself (`peer/block_selection.py`): after a random delay it reads the swarm
and takes the weakest window of as many blocks as fit its memory; every --balance-period (randomised) it checks
whether moving would help the swarm, and if so drains (announces DRAINING, lets open sessions finish for up to
--drain-timeout; clients reroute the rest), announces the old span offline, loads the new blocks and serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys

import hivemind
import torch
from prometheus_client import CollectorRegistry
from tqdm import tqdm

import swarm
from monitoring.peer_metrics import PeerMetrics, PeerStatistics, monotonic_to_unix, serving_metrics
from peer.announcer import Announcer
from peer.block_selection import blocks_that_fit, choose_span, plan_move
from peer.config import PeerConfig
from peer.handler import BlockHandler, HandlerLimits
from peer.kv_cache import KVCacheBudget
from peer.memory_budget import block_bytes, cache_bytes_per_token, default_memory_budget
from peer.runtime import BlockRuntime
from peer.throughput import (
    ObservedThroughput,
    ThroughputCache,
    measure_decode_throughput,
    network_tokens_per_second,
)
from swarm.dht import start_dht
from swarm.directory import read_swarm_view
from swarm.errors import ConfigError
from swarm.logs import short_id
from swarm.models import BlockSlice, ModelSource, load_block_slice, resolve_dtype
from swarm.protocol import PROTOCOL_VERSION, ModelRecord, PeerInfo, ServerInfo, ServerState, model_prefix_for
from swarm.signed_records import peer_identity
from swarm.swarm_key import SwarmKey

logger = logging.getLogger(__name__)

OFFLINE_ANNOUNCE_TIMEOUT_SECONDS = 3.0  # on the way out; if the DHT is already gone, the records simply expire


def run_peer(config: PeerConfig) -> None:
    """Serve until SIGINT or SIGTERM; blocks the calling thread."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    source = ModelSource.open(config.model, revision=config.revision)  # fail fast on a bad model or range ...
    if not config.auto_blocks:
        source.layout.check_range(config.start, config.end)
    dtype = resolve_dtype(config.dtype, config.device)  # ... or dtype, before any process starts
    swarm_key = None if config.swarm_key is None else SwarmKey.load(config.swarm_key)
    identity = peer_identity(config.identity_path)  # signs this peer's records (swarm/signed_records.py)
    try:
        dht = start_dht(
            config.initial_peers,
            host_maddrs=list(config.host_maddrs),
            announce_maddrs=list(config.announce_maddrs) or None,
            identity_path=str(identity.path),
            check_if_identity_free=identity.existed,  # a key made just now is in no one else's use
            client_mode=False,
            signing_key=identity.private_key_der,
            swarm_key=swarm_key,
        )
        identity.discard()  # p2pd has read it: a peer killed by SIGKILL leaves no key behind
        try:
            if dht.peer_id.to_base58() != identity.peer_id:
                raise ConfigError(f"p2pd runs as {dht.peer_id}, not as the identity {identity.path}")
            asyncio.run(Peer(config, source, dtype, dht, swarm_key).serve())
        finally:
            dht.shutdown()
    finally:
        identity.discard()


class Peer:
    """One peer serving blocks `span` = [start, end) of one model; the span changes only when the peer moves."""

    def __init__(
        self,
        config: PeerConfig,
        source: ModelSource,
        dtype: torch.dtype,
        dht: hivemind.DHT,
        swarm_key: SwarmKey | None = None,
    ):
        self.config = config
        self.swarm_key = swarm_key
        self.source = source
        self.dtype = dtype
        self.dtype_name = str(dtype).removeprefix("torch.")  # as announced and logged: "float32", "bfloat16"
        self.dht = dht
        self.model_prefix = config.model_prefix or model_prefix_for(config.model)
        self.span: tuple[int, int] = (config.start, config.end) if not config.auto_blocks else (0, 0)
        self.state = ServerState.JOINING
        self.throughput = 0.0  # announced: min(compute, network)
        self.seconds_per_block: float | None = None  # compute: seconds per token per block
        self.network_throughput = network_tokens_per_second(source.config.hidden_size, dtype, config.network_bandwidth)
        self.runtime: BlockRuntime | None = None
        self.budget = KVCacheBudget(config.cache_tokens)
        self.announcer = Announcer(
            dht,
            self.model_prefix,
            ModelRecord(name=config.model, num_blocks=source.layout.num_blocks),
            self.server_info,
            config.update_period,
        )
        self.metrics = PeerMetrics(CollectorRegistry())
        self.metrics.set_statistics_source(self.statistics)
        self.observed = ObservedThroughput(self.metrics.registry)
        self.throughput_cache = ThroughputCache()
        self._rng = random.Random()

    @property
    def num_hosted(self) -> int:
        """Blocks in the span served now."""
        return self.span[1] - self.span[0]

    def _show_span(self) -> None:
        start, end = self.span
        self.metrics.set_peer(
            version=swarm.__version__, model=self.config.model, model_prefix=self.model_prefix, start=start,
            end=end, dtype=self.dtype_name, peer_id=self.dht.peer_id.to_base58(),
        )  # fmt: skip

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
            start=self.span[0],
            end=self.span[1],
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
            start=self.span[0],
            end=self.span[1],
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
        if config.auto_blocks:
            self.span = await self._choose_span()
        self._show_span()
        await self.announcer.announce_now()  # JOINING: monitors see the peer while it loads, joiners avoid its span
        self.runtime = await self._new_runtime()
        limits = HandlerLimits.from_config(config, self.source.config.hidden_size)
        handler = BlockHandler(
            self.runtime, self.budget, limits, self.peer_info, lambda: self.state.routable, metrics=self.metrics,
            swarm_key=self.swarm_key, added_latency=self.config.added_latency,
            added_peer_latency=self.config.added_peer_latency, forward_noise=self.config.forward_noise,
        )  # fmt: skip
        p2p = await self.dht.replicate_p2p()
        await handler.add_p2p_handlers(p2p)
        self.state = ServerState.ONLINE
        await self.announcer.announce_now()  # "Serving" below means: routable now
        background = [
            asyncio.create_task(self.announcer.run(first_delay=config.update_period), name="announcer"),
            asyncio.create_task(self._follow_throughput(), name="throughput"),
        ]
        self._log_serving()
        try:
            if config.auto_blocks and config.balance_period > 0:
                await self._rebalance_until(stop, hurry, handler)
            await stop.wait()
            await self._drain(hurry)
        finally:
            start, end = self.span
            logger.info("Shutting down: announcing blocks %d:%d offline", start, end)
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.state = ServerState.OFFLINE
            await self.announcer.announce_now(timeout=OFFLINE_ANNOUNCE_TIMEOUT_SECONDS)
            self.runtime.close()

    def _log_serving(self) -> None:
        config = self.config
        logger.info(
            "Serving blocks %d:%d of %s (prefix %s) on %s in %s, %.1f tokens/s",
            *self.span, config.model, self.model_prefix, config.device, self.dtype_name, self.throughput,
        )  # fmt: skip

    async def _choose_span(self) -> tuple[int, int]:
        """As many blocks as fit, where the swarm is weakest; after a random delay, so that peers started together
        see each other's JOINING records instead of all taking the same blocks."""
        num_blocks = self.source.layout.num_blocks
        length = self._blocks_to_host(num_blocks)
        await asyncio.sleep(self._rng.uniform(0, self.config.start_jitter))
        view = await read_swarm_view(self.dht, self.model_prefix, num_blocks)
        throughputs = view.block_throughputs()
        start, end = choose_span(throughputs, length)
        logger.info(
            "Chose blocks %d:%d of %d: the weakest region of the swarm (%d peer(s) seen; uncovered blocks %d -> %d)",
            start, end, num_blocks, len(view.spans), throughputs.count(0.0),
            sum(value == 0.0 and not start <= i < end for i, value in enumerate(throughputs)),
        )  # fmt: skip
        return start, end

    def _blocks_to_host(self, num_blocks: int) -> int:
        config = self.config
        if config.num_blocks is not None:
            return min(config.num_blocks, num_blocks)
        budget = config.memory_budget or default_memory_budget(config.device)
        weights = block_bytes(self.source, self.dtype)
        cache = config.cache_tokens * cache_bytes_per_token(self.source.config, self.dtype)
        length = blocks_that_fit(budget, weights, cache, num_blocks)
        if length == 0:
            raise ConfigError(
                f"not even one block fits in {budget / 2**30:.2f} GiB: a block takes {weights / 2**30:.2f} GiB "
                f"and its KV cache ({config.cache_tokens} tokens) {cache / 2**30:.2f} GiB; raise --memory-budget "
                "or lower --cache-tokens"
            )
        logger.info(
            "%d of %d blocks fit in %.2f GiB (%.3f GiB of weights and %.3f GiB of KV cache each)",
            length, num_blocks, budget / 2**30, weights / 2**30, cache / 2**30,
        )  # fmt: skip
        return length

    async def _new_runtime(self) -> BlockRuntime:
        return BlockRuntime(
            await self._load(), self.config.output_noise, self.metrics.record_decode_batch,
            self.config.prefill_chunk_tokens, self.config.decode_gather_ms / 1000,
        )  # fmt: skip

    async def _load(self) -> BlockSlice:
        """Load the span's blocks and know their speed: from the on-disk cache, or measured now."""
        block_slice = await asyncio.to_thread(self._load_blocks)
        key = self._throughput_key()
        self.seconds_per_block = self.seconds_per_block or self.throughput_cache.get(key)
        if self.seconds_per_block is None:
            measured = await asyncio.to_thread(measure_decode_throughput, block_slice)
            self.seconds_per_block = 1.0 / (measured * self.num_hosted)
            self.throughput_cache.put(key, self.seconds_per_block)
        self._update_throughput()
        return block_slice

    def _throughput_key(self) -> str:
        config = self.source.config
        shape = f"{self.source.layout.num_blocks}x{config.hidden_size}"
        return f"{self.model_prefix}|{shape}|{self.config.device}|{self.dtype_name}|{torch.get_num_threads()}threads"

    def _update_throughput(self) -> None:
        assert self.seconds_per_block is not None
        compute = 1.0 / (self.seconds_per_block * self.num_hosted)
        self.throughput = min(compute, self.network_throughput)

    async def _follow_throughput(self) -> None:
        """Every update period, fold the decode speed real sessions got into the announced throughput."""
        while True:
            await asyncio.sleep(self.config.update_period)
            observed = self.observed.update(self.num_hosted)
            if observed is not None:
                self.seconds_per_block = observed
                self._update_throughput()

    async def _rebalance_until(self, stop: asyncio.Event, hurry: asyncio.Event, handler: BlockHandler) -> None:
        """Check every --balance-period (randomised +-50%, so peers do not all move at once) whether moving
        would help the swarm; move when it would. Returns when `stop` is set."""
        period = self.config.balance_period
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._rng.uniform(0.5 * period, 1.5 * period))
            if stop.is_set():
                return
            try:
                view = await read_swarm_view(self.dht, self.model_prefix, self.source.layout.num_blocks)
            except Exception as e:
                logger.warning("Could not read the swarm to check the balance: %s", e)
                continue
            move = plan_move(
                view, self.dht.peer_id.to_base58(), self.span, self.throughput, self.config.balance_min_improvement
            )
            if move is not None:
                logger.info(
                    "Moving from blocks %d:%d to %d:%d: %s", *self.span, move.start, move.end, move.describe()
                )  # fmt: skip
                await self._move(move.start, move.end, hurry, handler)

    async def _move(self, start: int, end: int, hurry: asyncio.Event, handler: BlockHandler) -> None:
        """Drain the current span, announce it offline, then load and serve blocks [start, end).

        Sessions still open after the drain keep the old blocks (their weights stay referenced) until they end;
        new sessions are refused while the peer is not ONLINE, so clients route around it meanwhile.
        """
        await self._drain(hurry)
        self.state = ServerState.OFFLINE
        await self.announcer.announce_now()  # the old span's records: offline until they expire
        self.span = (start, end)
        self.state = ServerState.JOINING
        self._show_span()
        await self.announcer.announce_now()
        old_runtime, self.runtime = self.runtime, await self._new_runtime()
        handler.runtime = self.runtime
        if old_runtime is not None:
            old_runtime.close()
        self.state = ServerState.ONLINE
        await self.announcer.announce_now()
        self._log_serving()

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

    def _load_blocks(self) -> BlockSlice:
        start, end = self.span
        with tqdm(
            total=end - start, desc=f"Loading blocks {start}:{end}", unit="block", file=sys.stderr, disable=None,
        ) as progress:  # fmt: skip
            return load_block_slice(
                self.source, start, end, dtype=self.dtype, device=self.config.device,
                on_block_read=lambda _: progress.update(1),
            )  # fmt: skip
