"""`ClientConfig`: how a client reaches the swarm and how patient it is."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ClientConfig:
    initial_peers: tuple[str, ...]  # multiaddrs of swarm members (a bootstrap node or any peer)
    model_prefix: str = ""  # DHT key prefix of the model; derived from the model name when empty
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)  # clients only dial out
    request_timeout: float = 30.0  # seconds for one step or call to one peer
    connect_timeout: float = 10.0  # seconds to wait for the DHT to show every block covered
    ping_timeout: float = 2.0  # seconds for a latency probe
    ban_seconds: float = 15.0  # how long a failed peer is left out of routes
    view_max_age: float = 1.0  # seconds a read of the DHT is reused when building routes

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise ConfigError("initial_peers is empty: pass the multiaddr printed by `swarm-dht` or any peer")
        for name in ("request_timeout", "connect_timeout", "ping_timeout", "ban_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
