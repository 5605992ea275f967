"""Reading and writing the swarm's records in hivemind's DHT, for peers, clients and monitors alike.

hivemind's `DHT` runs in its own process; the coroutines below are shipped to it with `run_coroutine`, so they
are module-level functions (picklable by reference) and callers await the returned future instead of blocking.
Malformed records are dropped here, with a debug line, and never reach routing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarm.errors import ProtocolError
from swarm.protocol import MODELS_KEY, ModelRecord, ServerInfo, ServerState, block_key

logger = logging.getLogger(__name__)

UNMEASURED_THROUGHPUT = 1.0  # tokens/s counted for a peer that announces none yet


@dataclass(frozen=True, slots=True)
class RemoteSpan:
    """One peer's announced span."""

    peer_id: str  # base58
    info: ServerInfo
    expiration_time: float = float("inf")  # DHT time (wall clock) after which the record is gone

    @property
    def start(self) -> int:
        return self.info.start

    @property
    def end(self) -> int:
        return self.info.end


@dataclass(frozen=True, slots=True)
class SwarmView:
    """Every peer's announced span of one model at one moment."""

    model_prefix: str
    num_blocks: int
    spans: tuple[RemoteSpan, ...]

    def merged_with(self, older: SwarmView, now: float) -> SwarmView:
        """This view plus the records of `older` that have not expired and that this view lacks.

        A DHT lookup can miss keys while a node holding them is unresponsive (a stopped process answers
        nothing until hivemind's RPC timeout); records already seen stay valid until their own expiration.
        """
        fresh = {span.peer_id for span in self.spans}
        kept = [s for s in older.spans if s.peer_id not in fresh and s.expiration_time > now]
        return SwarmView(
            self.model_prefix, self.num_blocks, tuple(sorted((*self.spans, *kept), key=lambda s: s.peer_id))
        )

    def unexpired(self, now: float) -> SwarmView:
        return SwarmView(self.model_prefix, self.num_blocks, tuple(s for s in self.spans if s.expiration_time > now))

    def peers_for_block(self, block_index: int) -> list[RemoteSpan]:
        return [span for span in self.spans if span.start <= block_index < span.end]

    def block_throughputs(self, exclude: str | None = None) -> list[float]:
        """Per block, the summed announced throughput of the peers serving it or about to (ONLINE or JOINING),
        leaving out peer `exclude`: what load balancing compares. Draining and offline peers count for nothing."""
        totals = [0.0] * self.num_blocks
        for span in self.spans:
            if span.peer_id != exclude and span.info.state in (ServerState.ONLINE, ServerState.JOINING):
                # a peer still loading may not know its speed yet (0): it covers its blocks all the same
                throughput = max(span.info.throughput, UNMEASURED_THROUGHPUT)
                for index in range(span.start, min(span.end, self.num_blocks)):
                    totals[index] += throughput
        return totals

    def missing_blocks(self, routable_only: bool = True) -> list[int]:
        spans = [s for s in self.spans if s.info.state.routable] if routable_only else list(self.spans)
        return [i for i in range(self.num_blocks) if not any(s.start <= i < s.end for s in spans)]


async def announce_blocks(dht: DHT, model_prefix: str, peer_id: str, info: ServerInfo, expiration: float) -> bool:
    """Store `info` under every block key of its span, as this peer's subkey. True if every store succeeded."""
    keys = [block_key(model_prefix, i) for i in range(info.start, info.end)]
    store = partial(
        _store_many, keys=keys, subkey=peer_id, value=info.to_wire(), expiration=get_dht_time() + expiration
    )
    results = await dht.run_coroutine(store, return_future=True)
    return all(results.values())


async def announce_model(dht: DHT, model_prefix: str, record: ModelRecord, expiration: float) -> bool:
    store = partial(
        _store_many,
        keys=[MODELS_KEY],
        subkey=model_prefix,
        value=record.to_wire(),
        expiration=get_dht_time() + expiration,
    )
    results = await dht.run_coroutine(store, return_future=True)
    return all(results.values())


async def read_swarm_view(dht: DHT, model_prefix: str, num_blocks: int) -> SwarmView:
    """Every live (unexpired) server record of the model's blocks, one span per peer."""
    keys = [block_key(model_prefix, i) for i in range(num_blocks)]
    found = await dht.run_coroutine(partial(_get_many, keys=keys), return_future=True)
    spans: dict[str, RemoteSpan] = {}
    for key in keys:
        for peer_id, (value, expiration_time) in found.get(key, {}).items():
            try:
                info = ServerInfo.from_wire(value)
                if info.end > num_blocks:
                    raise ProtocolError(f"span {info.start}:{info.end} exceeds {num_blocks} blocks")
            except ProtocolError as e:
                logger.debug("Dropping malformed record of peer %s under %s: %s", peer_id, key, e)
                continue
            spans.setdefault(peer_id, RemoteSpan(peer_id, info, expiration_time))
    return SwarmView(model_prefix, num_blocks, tuple(span for _, span in sorted(spans.items())))


async def read_models(dht: DHT) -> dict[str, ModelRecord]:
    """Model prefix -> record, for every model some peer announces."""
    found = await dht.run_coroutine(partial(_get_many, keys=[MODELS_KEY]), return_future=True)
    models = {}
    for prefix, (value, _) in found.get(MODELS_KEY, {}).items():
        try:
            models[prefix] = ModelRecord.from_wire(value)
        except ProtocolError as e:
            logger.debug("Dropping malformed model record %s: %s", prefix, e)
    return models


async def count_dht_peers(dht: DHT) -> int:
    """Peers in this DHT node's routing table: how much of the swarm it can reach without a lookup."""
    return await dht.run_coroutine(_routing_table_size, return_future=True)


async def ping_dht_peers(dht: DHT, peer_ids: Sequence[str]) -> dict[str, float | None]:
    """peer id -> round-trip seconds of a DHT ping, or None where the peer did not answer (within the DHT's
    wait timeout). Works for any DHT node, bootstrap nodes included."""
    return await dht.run_coroutine(partial(_ping_many, peer_ids=list(peer_ids)), return_future=True)


async def _routing_table_size(_dht: DHT, node: DHTNode) -> int:
    return len(node.protocol.routing_table.peer_id_to_uid)


async def _ping_many(_dht: DHT, node: DHTNode, peer_ids: Sequence[str]) -> dict[str, float | None]:
    async def ping(peer_id: str) -> float | None:
        began = time.perf_counter()
        answered = await node.protocol.call_ping(PeerID.from_base58(peer_id))
        return time.perf_counter() - began if answered is not None else None

    seconds = await asyncio.gather(*map(ping, peer_ids))
    return dict(zip(peer_ids, seconds, strict=True))


async def _store_many(
    _dht: DHT, node: DHTNode, keys: Sequence[str], subkey: str, value: Any, expiration: float
) -> dict[str, bool]:
    results = await node.store_many(list(keys), [value] * len(keys), expiration, subkeys=[subkey] * len(keys))
    return {str(key): bool(ok) for key, ok in results.items()}


async def _get_many(_dht: DHT, node: DHTNode, keys: Sequence[str]) -> dict[str, dict[str, tuple[Any, float]]]:
    """key -> {subkey: (value, expiration)} of the latest unexpired entries (plain data: it crosses processes)."""
    found = await node.get_many(list(keys), sufficient_expiration_time=float("inf"))
    now = get_dht_time()
    result: dict[str, dict[str, Any]] = {}
    for key, entry in found.items():
        if entry is None or not isinstance(entry.value, dict):
            continue
        result[str(key)] = {
            str(subkey): (item.value, item.expiration_time)
            for subkey, item in entry.value.items()
            if item.expiration_time > now
        }
    return result
