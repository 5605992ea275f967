"""One crawl of the swarm as plain data: what `/api/v1/state` returns and what the metrics are read from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from swarm.directory import SwarmView
from swarm.protocol import ModelRecord, ServerState

STATES = tuple(state.value for state in ServerState)


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """One peer's announced span, and whether it answered the monitor."""

    peer_id: str
    state: str  # a ServerState value
    start: int
    end: int
    throughput: float  # tokens/s it announces through its span
    cache_tokens_left: int
    dtype: str
    version: str
    public_name: str
    ping_seconds: float | None  # round trip of an info RPC; None: it did not answer

    @property
    def reachable(self) -> bool:
        return self.ping_seconds is not None


@dataclass(frozen=True, slots=True)
class BlockCoverage:
    """Who serves one block: peer counts by announced state, and the online peers' summed throughput."""

    index: int
    peers_by_state: dict[str, int]
    throughput: float

    @property
    def online_peers(self) -> int:
        return self.peers_by_state[ServerState.ONLINE.value]


@dataclass(frozen=True, slots=True)
class ModelEntry:
    prefix: str
    name: str
    num_blocks: int
    peers: tuple[PeerEntry, ...]
    blocks: tuple[BlockCoverage, ...]

    @property
    def missing_blocks(self) -> list[int]:
        """Blocks no online peer serves: a route through the model cannot be built."""
        return [block.index for block in self.blocks if block.online_peers == 0]

    @property
    def healthy(self) -> bool:
        return not self.missing_blocks

    @property
    def weakest_block(self) -> int | None:
        """The block with the least online throughput (the first of equals): where a new peer helps most."""
        return min(self.blocks, key=lambda block: block.throughput).index if self.blocks else None

    @classmethod
    def from_view(cls, record: ModelRecord, view: SwarmView, pings: dict[str, float | None]) -> ModelEntry:
        peers = tuple(
            PeerEntry(
                peer_id=span.peer_id,
                state=span.info.state.value,
                start=span.start,
                end=span.end,
                throughput=span.info.throughput,
                cache_tokens_left=span.info.cache_tokens_left,
                dtype=span.info.dtype,
                version=span.info.version,
                public_name=span.info.public_name,
                ping_seconds=pings.get(span.peer_id),
            )
            for span in view.spans
        )
        blocks = []
        for index in range(view.num_blocks):
            serving = [peer for peer in peers if peer.start <= index < peer.end]
            by_state = {state: sum(peer.state == state for peer in serving) for state in STATES}
            online = sum(peer.throughput for peer in serving if peer.state == ServerState.ONLINE.value)
            blocks.append(BlockCoverage(index, by_state, online))
        return cls(view.model_prefix, record.name, view.num_blocks, peers, tuple(blocks))


@dataclass(frozen=True, slots=True)
class BootstrapEntry:
    address: str  # the --initial-peers multiaddr
    ping_seconds: float | None  # round trip of a DHT ping; None: unreachable

    @property
    def reachable(self) -> bool:
        return self.ping_seconds is not None


@dataclass(frozen=True, slots=True)
class SwarmSnapshot:
    taken_at: float  # Unix time the crawl finished
    crawl_seconds: float
    models: tuple[ModelEntry, ...]
    bootstraps: tuple[BootstrapEntry, ...]

    def to_json(self) -> dict[str, Any]:
        """The `/api/v1/state` document: the records as crawled plus the derived coverage, per model."""
        return {
            "taken_at": self.taken_at,
            "crawl_seconds": self.crawl_seconds,
            "bootstraps": [{**asdict(entry), "reachable": entry.reachable} for entry in self.bootstraps],
            "models": [
                {
                    "prefix": model.prefix,
                    "name": model.name,
                    "num_blocks": model.num_blocks,
                    "healthy": model.healthy,
                    "missing_blocks": model.missing_blocks,
                    "weakest_block": model.weakest_block,
                    "blocks": [asdict(block) for block in model.blocks],
                    "peers": [{**asdict(peer), "reachable": peer.reachable} for peer in model.peers],
                }
                for model in self.models
            ],
        }
