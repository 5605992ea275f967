"""One crawl: which models the DHT lists, every peer record of their blocks, and a ping of every peer and bootstrap.

Peers are pinged with the `info` RPC clients use, so "reachable" means "a client could talk to it now", not only
"its DHT node answers". Bootstrap nodes serve no RPCs, so they get a DHT ping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Sequence

from hivemind import DHT
from hivemind.p2p import P2P
from hivemind.utils.multiaddr import Multiaddr

from monitoring.swarm_monitor.state import BootstrapEntry, ModelEntry, SwarmSnapshot
from swarm.client.transport import call_info
from swarm.directory import ping_dht_peers, read_models, read_swarm_view
from swarm.errors import SwarmError
from swarm.logs import short_id

logger = logging.getLogger(__name__)


async def crawl(
    dht: DHT, p2p: P2P, initial_peers: Sequence[str], models: Collection[str], ping_timeout: float
) -> SwarmSnapshot:
    """The swarm now. `models`: prefixes or names to report (empty: every model the DHT lists)."""
    began = time.perf_counter()
    records = await read_models(dht)
    wanted = {
        prefix: record
        for prefix, record in sorted(records.items())
        if not models or prefix in models or record.name in models
    }
    views = await asyncio.gather(*(read_swarm_view(dht, prefix, r.num_blocks) for prefix, r in wanted.items()))
    peer_ids = sorted({span.peer_id for view in views for span in view.spans})
    peer_pings, bootstrap_pings = await asyncio.gather(
        asyncio.gather(*(_ping_peer(p2p, peer_id, ping_timeout) for peer_id in peer_ids)),
        _ping_bootstraps(dht, initial_peers),
    )
    pings = dict(zip(peer_ids, peer_pings, strict=True))
    entries = tuple(
        ModelEntry.from_view(record, view, pings) for record, view in zip(wanted.values(), views, strict=True)
    )
    return SwarmSnapshot(time.time(), time.perf_counter() - began, entries, bootstrap_pings)


async def _ping_peer(p2p: P2P, peer_id: str, timeout: float) -> float | None:
    began = time.perf_counter()
    try:
        await call_info(p2p, peer_id, timeout)
    except SwarmError as e:
        logger.debug("Peer %s did not answer a ping: %s", short_id(peer_id), e)
        return None
    return time.perf_counter() - began


async def _ping_bootstraps(dht: DHT, initial_peers: Sequence[str]) -> tuple[BootstrapEntry, ...]:
    peer_ids = [Multiaddr(address).value_for_protocol("p2p") for address in initial_peers]
    pings = await ping_dht_peers(dht, peer_ids)
    pairs = zip(initial_peers, peer_ids, strict=True)
    return tuple(BootstrapEntry(address, pings[peer_id]) for address, peer_id in pairs)
