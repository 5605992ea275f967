"""The client's handle on the swarm for one model: DHT, P2P, peer latencies, bans and route choice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Collection

from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from swarm.client._sync import run_sync
from swarm.client.routing import Route, choose_route
from swarm.client.transport import call_info
from swarm.client.verification import CheckSchedule
from swarm.config import ClientConfig
from swarm.dht import start_dht
from swarm.directory import SwarmView, read_swarm_view
from swarm.errors import MissingBlocksError, PeerError
from swarm.logs import short_id
from swarm.swarm_key import KeyedP2P, SwarmKey

logger = logging.getLogger(__name__)

LATENCY_MAX_AGE_SECONDS = 300.0  # re-ping a peer after this long
PING_SAMPLES = 3  # warm round trips per latency probe
COVERAGE_POLL_SECONDS = 0.25  # how often to re-read the DHT while waiting for blocks to appear


class SwarmClient:
    """Reads the swarm's records and builds routes; all coroutines run on the client loop."""

    def __init__(self, config: ClientConfig, model_prefix: str, num_blocks: int):
        self.config = config
        self.model_prefix = model_prefix
        self.num_blocks = num_blocks
        self.swarm_key = None if config.swarm_key is None else SwarmKey.load(config.swarm_key)
        self.dht = start_dht(
            config.initial_peers,
            client_mode=True,
            host_maddrs=list(config.host_maddrs),
            wait_timeout=config.dht_timeout,
            swarm_key=self.swarm_key,
        )
        self._p2p: P2P | None = None
        self._view: SwarmView | None = None
        self._view_time = -float("inf")
        self._latencies: dict[str, tuple[float, float]] = {}  # peer -> (seconds, measured at)
        self._banned_until: dict[str, float] = {}
        self._failures_in_a_row: dict[str, int] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self.spot_checks = CheckSchedule(config.verify_rate, self._rng)  # of stateless forward/backward calls

    async def p2p(self) -> P2P:
        """The P2P handle for calls to peers (in a private swarm, one that shows this member's token)."""
        if self._p2p is None:
            p2p = await self.dht.replicate_p2p()
            self._p2p = p2p if self.swarm_key is None else KeyedP2P(p2p, self.swarm_key)
        return self._p2p

    async def known_view(self, refresh: bool = True) -> SwarmView:
        """The unexpired records already known, at once; stale ones (older than view_max_age) are re-read in the
        background (unless not `refresh`: the caller calls `refresh_view_if_stale` when it suits it), so opening a
        session or rerouting never waits on a DHT lookup (which may even stall on the very peer that just hung).
        Only the first call reads the DHT on the spot."""
        if self._view is None:
            return await self.view(max_age=0)
        if refresh:
            self.refresh_view_if_stale()
        return self._view.unexpired(get_dht_time())

    def refresh_view_if_stale(self) -> None:
        """Start re-reading the DHT in the background if the view is older than view_max_age (and no re-read
        runs)."""
        if time.monotonic() - self._view_time > self.config.view_max_age and (
            self._refreshing is None or self._refreshing.done()
        ):
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_view())

    async def _refresh_view(self) -> None:
        try:
            await self.view(max_age=0)
        except Exception:
            logger.debug("Refreshing the swarm view failed; the next route tries again", exc_info=True)

    async def view(self, max_age: float | None = None) -> SwarmView:
        max_age = self.config.view_max_age if max_age is None else max_age
        if self._view is None or time.monotonic() - self._view_time > max_age:
            fresh = await read_swarm_view(self.dht, self.model_prefix, self.num_blocks)
            self._view = fresh if self._view is None else fresh.merged_with(self._view, get_dht_time())
            self._view_time = time.monotonic()
        return self._view

    def ban(self, peer_id: str, reason: str) -> None:
        """Leave a failed peer out of routes; each failure in a row doubles the ban (exponential backoff)."""
        failures = self._failures_in_a_row.get(peer_id, 0) + 1
        self._failures_in_a_row[peer_id] = failures
        seconds = min(self.config.ban_seconds * 2 ** (failures - 1), self.config.max_ban_seconds)
        logger.warning("Leaving peer %s out of routes for %.0f s: %s", short_id(peer_id), seconds, reason)
        self._banned_until[peer_id] = time.monotonic() + seconds
        self._latencies.pop(peer_id, None)  # re-measure when it comes back

    def record_success(self, peer_id: str) -> None:
        """A peer served a session: its next failure starts the backoff afresh."""
        self._failures_in_a_row.pop(peer_id, None)

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {peer for peer, until in self._banned_until.items() if until > now}

    async def make_route(
        self,
        start: int,
        end: int,
        *,
        min_cache_tokens: int = 0,
        exclude: Collection[str] = (),
        wait: bool = True,
        spread_load: bool = False,
        refresh_view: bool = True,
    ) -> Route:
        """The best route over blocks [start, end) now, avoiding banned and `exclude`d peers; waits up to
        connect_timeout for missing blocks to appear (unless `wait` is false). `spread_load`: training calls,
        spread over replicas in proportion to throughput (see `routing`). `refresh_view`: as in `known_view`.

        The first attempt routes over the records already known (`known_view`); later ones read the DHT afresh.
        A stale pick costs little: a peer that is gone fails the first step and the session routes around it.
        """
        deadline = time.monotonic() + self.config.connect_timeout
        attempt = 0
        while True:
            view = await (self.known_view(refresh_view) if attempt == 0 else self.view(max_age=0))
            attempt += 1
            await self._measure_latencies(view)
            try:
                route = choose_route(
                    view,
                    start,
                    end,
                    latencies={peer: seconds for peer, (seconds, _) in self._latencies.items()},
                    banned=self.banned() | set(exclude),
                    min_cache_tokens=min_cache_tokens,
                    rng=self._rng,
                    spread_load=spread_load,
                    trusted=self.config.trusted_peers,
                )
            except MissingBlocksError:
                if not wait or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(COVERAGE_POLL_SECONDS)
                continue
            logger.info("Route: %s", route.describe())
            return route

    async def wait_blocks_covered(self, timeout: float) -> SwarmView:
        """The swarm view once every block has an online peer, or `MissingBlocksError` after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            view = await self.view(max_age=0)
            missing = view.missing_blocks()
            if not missing:
                return view
            if time.monotonic() >= deadline:
                raise MissingBlocksError(self.model_prefix, missing)
            await asyncio.sleep(COVERAGE_POLL_SECONDS)

    def close(self) -> None:
        """Leave the swarm: stop this client's P2P replica, then its DHT process and p2pd."""
        if self._refreshing is not None:
            self._refreshing.get_loop().call_soon_threadsafe(self._refreshing.cancel)
        if self._p2p is not None:
            with contextlib.suppress(Exception):
                run_sync(self._p2p.shutdown(), timeout=5.0)
            self._p2p = None
        self.dht.shutdown()

    async def _measure_latencies(self, view: SwarmView) -> None:
        now = time.monotonic()
        stale = [
            span.peer_id
            for span in view.spans
            if span.info.state.routable
            and span.peer_id not in self.banned()
            and now - self._latencies.get(span.peer_id, (0.0, -float("inf")))[1] > LATENCY_MAX_AGE_SECONDS
        ]
        if stale:
            await asyncio.gather(*(self._ping(peer) for peer in stale))

    async def _ping(self, peer_id: str) -> None:
        """Round-trip time of an info call on a warm connection (the first call also dials and handshakes): the
        fastest of PING_SAMPLES, since a busy host only ever adds delay to a sample."""
        p2p = await self.p2p()
        samples = []
        try:
            await call_info(p2p, peer_id, self.config.ping_timeout)
            for _ in range(PING_SAMPLES):
                began = time.perf_counter()
                await call_info(p2p, peer_id, self.config.ping_timeout)
                samples.append(time.perf_counter() - began)
        except PeerError as e:
            self.ban(peer_id, str(e))
            return
        self._latencies[peer_id] = (min(samples), time.monotonic())
