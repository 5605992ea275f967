"""Keeps this peer's records alive in the DHT: renews them every period, marks them OFFLINE on the way out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from hivemind import DHT

from swarm.asyncio_compat import asyncio_timeout
from swarm.directory import announce_blocks, announce_model, count_dht_peers
from swarm.protocol import ModelRecord, ServerInfo

logger = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class AnnouncerStatistics:
    successes_total: int
    failures_total: int
    last_success_monotonic: float | None
    dht_peers_seen: int  # routing-table size at the last announcement


class Announcer:
    """Re-announces `server_info()` under every hosted block key each `update_period` seconds.

    Records expire after `expiration_periods` periods, so a peer that dies silently disappears from routing
    within that time even though it never said goodbye.
    """

    def __init__(
        self,
        dht: DHT,
        model_prefix: str,
        model_record: ModelRecord,
        server_info: Callable[[], ServerInfo],
        update_period: float,
        expiration_periods: float = 3.0,
    ):
        self.dht = dht
        self.peer_id = dht.peer_id.to_base58()
        self.model_prefix = model_prefix
        self.model_record = model_record
        self.server_info = server_info
        self.update_period = update_period
        self.expiration = update_period * expiration_periods
        self._successes = 0
        self._failures = 0
        self._last_success: float | None = None
        self._dht_peers_seen = 0

    async def announce_now(self, *, timeout: float = ANNOUNCE_TIMEOUT_SECONDS) -> bool:
        """Store the current record now. Every record expires later than the one before (hivemind keeps the
        latest-expiring value), so an OFFLINE record replaces the ONLINE one instead of being refused."""
        info = self.server_info()
        try:
            async with asyncio_timeout(timeout):  # the DHT or its p2pd may already be gone
                ok = await announce_blocks(self.dht, self.model_prefix, self.peer_id, info, self.expiration)
                ok &= await announce_model(self.dht, self.model_prefix, self.model_record, self.expiration)
                self._dht_peers_seen = await count_dht_peers(self.dht)
        except TimeoutError:
            logger.warning(
                "The DHT did not answer within %.0f s while announcing blocks %d:%d", timeout, info.start, info.end
            )
            ok = False
        except Exception:
            logger.exception("Announcing blocks %d:%d failed", info.start, info.end)
            ok = False
        if ok:
            self._successes += 1
            self._last_success = asyncio.get_running_loop().time()
        else:
            self._failures += 1
            logger.warning("The DHT did not store every record of blocks %d:%d; retrying", info.start, info.end)
        return ok

    async def run(self, first_delay: float = 0.0) -> None:
        """Announce every `update_period` seconds, counted from the start of each round: a slow DHT round (an
        unresponsive node stalls stores) must not stretch the period past the records' lifetime."""
        delay = first_delay
        while True:
            await asyncio.sleep(delay)
            began = time.monotonic()
            await self.announce_now()
            delay = max(0.0, self.update_period - (time.monotonic() - began))

    def statistics(self) -> AnnouncerStatistics:
        return AnnouncerStatistics(self._successes, self._failures, self._last_success, self._dht_peers_seen)
