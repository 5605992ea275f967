"""`PeerConfig`: everything a peer is told at start, built once by `peer/__main__.py` and never patched."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.errors import ConfigError


@dataclass(frozen=True, slots=True)
class PeerConfig:
    model: str  # local directory or Hugging Face id
    start: int  # first hosted block
    end: int  # one past the last hosted block
    initial_peers: tuple[str, ...] = ()
    new_swarm: bool = False  # start a swarm of one instead of joining through initial_peers
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    identity_path: str | None = None  # private key file: keeps the peer id across restarts
    device: str = "cpu"
    dtype: str = "auto"
    cache_tokens: int = 16384  # KV-cache token positions over all sessions and batch rows
    max_batch_size: int = 8
    inference_max_length: int = 4096  # tokens one inference session may reach
    session_idle_timeout: float = 600.0  # seconds a session may wait between steps
    public_name: str = ""
    model_prefix: str = ""  # DHT key prefix; derived from the model name when empty
    update_period: float = 30.0  # seconds between DHT announcements; records live 3 periods
    drain_timeout: float = 30.0  # seconds open sessions may finish after SIGTERM before the peer leaves
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    revision: str | None = None
    metrics_port: int | None = None  # serve Prometheus metrics at http://metrics_addr:port/metrics; 0: a free port
    metrics_addr: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ConfigError(f"--blocks {self.start}:{self.end} must satisfy 0 <= start < end")
        if not self.initial_peers and not self.new_swarm:
            raise ConfigError("pass --initial-peers MULTIADDR to join a swarm, or --new-swarm to start one")
        for name in ("cache_tokens", "max_batch_size", "inference_max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.update_period <= 0 or self.session_idle_timeout <= 0:
            raise ConfigError("--update-period and --session-idle-timeout must be positive")
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout must not be negative")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError("--metrics-port must be between 0 and 65535")


def parse_blocks(text: str) -> tuple[int, int]:
    """'0:12' -> (0, 12): a half-open range, like a Python slice."""
    try:
        start_text, end_text = text.split(":")
        return int(start_text), int(end_text)
    except ValueError:
        raise ConfigError(f"--blocks must look like START:END (for example 0:12), got {text!r}") from None
