"""`ClientConfig`: how a client reaches the swarm and how patient it is."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.errors import ConfigError
from swarm.protocol import WIRE_COMPRESSIONS

# Spot checks (swarm/client/verification.py): 1 step in 100 on average, at least 1 in 199, is recomputed elsewhere
DEFAULT_VERIFY_RATE = 0.01


@dataclass(frozen=True, slots=True)
class ClientConfig:
    initial_peers: tuple[str, ...]  # multiaddrs of swarm members (a bootstrap node or any peer)
    model_prefix: str = ""  # DHT key prefix of the model; derived from the model name when empty
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)  # clients only dial out
    request_timeout: float = 30.0  # seconds for one step or call to one peer
    connect_timeout: float = 10.0  # seconds to wait for the DHT to show every block covered
    ping_timeout: float = 2.0  # seconds for a latency probe
    ban_seconds: float = 15.0  # first ban of a failed peer; doubles with each further failure ...
    max_ban_seconds: float = 300.0  # ... up to this
    max_retries: int = 5  # replacement attempts for one failed span of one step before giving up
    min_step_timeout: float = 3.0  # floor of the adaptive per-step timeout that detects a hung peer
    hung_step_factor: float = 10.0  # a decode step slower than this many times the recent ones is a hang
    view_max_age: float = 1.0  # seconds a read of the DHT is reused when building routes
    dht_timeout: float = 2.0  # seconds a DHT node may take to answer before a lookup goes on without it
    max_sub_batch_size: int = 8  # rows per stateless forward/backward call; larger batches go as parallel parts
    verify_rate: float = DEFAULT_VERIFY_RATE  # share of each peer's steps an independent peer recomputes
    swarm_key: str | None = None  # key file of a private swarm (swarm/swarm_key.py); None: an open swarm
    trusted_peers: tuple[str, ...] = ()  # peer ids that alone may run the first and last blocks (privacy)
    prefill_chunk_tokens: int = 128  # a longer prompt flows down the route in chunks, every peer busy at once; 0: off
    wire_compression: str = "none"  # hidden states to and from peers: "none" (exact), "fp16" or "8bit" (lossy)
    forward_steps: bool = True  # each span's peer sends a step's output straight on to the next span's peer

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise ConfigError("initial_peers is empty: pass the multiaddr printed by `swarm-dht` or any peer")
        for name in (
            "request_timeout",
            "connect_timeout",
            "ping_timeout",
            "ban_seconds",
            "min_step_timeout",
            "dht_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if not 0.0 <= self.verify_rate <= 1.0:
            raise ConfigError(f"verify_rate must be within [0, 1], got {self.verify_rate}")
        if self.prefill_chunk_tokens < 0:
            raise ConfigError("prefill_chunk_tokens must be >= 0 (0 sends a prompt whole to one span after another)")
        check_wire_compression(self.wire_compression)
        if self.max_sub_batch_size <= 0:
            raise ConfigError("max_sub_batch_size must be positive")
        if self.max_retries < 0 or self.hung_step_factor <= 1:
            raise ConfigError("max_retries must be >= 0 and hung_step_factor > 1")


def check_wire_compression(name: str) -> None:
    """ConfigError unless `name` is one of WIRE_COMPRESSIONS (a client's setting, or one session's)."""
    if name not in WIRE_COMPRESSIONS:
        raise ConfigError(f"wire_compression must be one of {', '.join(WIRE_COMPRESSIONS)}, got {name!r}")
