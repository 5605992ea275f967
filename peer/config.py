"""`PeerConfig`: everything a peer is told at start, built once by `peer/__main__.py` and never patched."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.errors import ConfigError

MIN_DEFAULT_MESSAGE_BYTES = 64 * 2**20  # the derived --max-message-bytes never goes below this: room for adapters
DEFAULT_MAX_SESSIONS_PER_CLIENT = 64  # a gateway (one client) runs up to 64 generations at once, each a session
DEFAULT_MAX_REQUESTS_PER_CLIENT = 64  # a client sends a large batch as parallel parts of max_sub_batch_size rows


@dataclass(frozen=True, slots=True)
class PeerConfig:
    model: str  # local directory or Hugging Face id
    start: int | None = None  # first hosted block; None (with end None): chosen where the swarm is weakest
    end: int | None = None  # one past the last hosted block
    initial_peers: tuple[str, ...] = ()
    new_swarm: bool = False  # start a swarm of one instead of joining through initial_peers
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    identity_path: str | None = None  # private key file: keeps the peer id across restarts
    swarm_key: str | None = None  # key file of a private swarm (swarm/swarm_key.py); None: an open swarm
    device: str = "cpu"
    dtype: str = "auto"
    cache_tokens: int = 16384  # KV-cache token positions over all sessions and batch rows
    max_batch_size: int = 8
    inference_max_length: int = 4096  # tokens one inference session may reach
    prefill_chunk_tokens: int = 512  # a longer inference step runs in parts, other sessions' decode steps between
    decode_gather_ms: float = 30.0  # longest wait of a decode step for the other decoding sessions' steps
    session_idle_timeout: float = 600.0  # seconds a session may wait between steps
    max_sessions_per_client: int = DEFAULT_MAX_SESSIONS_PER_CLIENT  # inference sessions one remote peer may hold
    max_requests_per_client: int = DEFAULT_MAX_REQUESTS_PER_CLIENT  # forward/backward calls in flight per remote peer
    max_message_bytes: int | None = None  # per message and per chunked stream; None: default_max_message_bytes()
    public_name: str = ""
    model_prefix: str = ""  # DHT key prefix; derived from the model name when empty
    update_period: float = 30.0  # seconds between DHT announcements; records live 3 periods
    drain_timeout: float = 30.0  # seconds open sessions may finish after SIGTERM before the peer leaves
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    revision: str | None = None
    metrics_port: int | None = None  # serve Prometheus metrics at http://metrics_addr:port/metrics; 0: a free port
    metrics_addr: str = "127.0.0.1"
    # Automatic placement (without --blocks): how many blocks, where, and when to move.
    num_blocks: int | None = None  # blocks to host; None: as many as the memory budget holds
    memory_budget: int | None = None  # bytes for weights and KV cache; None: free memory less a margin
    start_jitter: float = 3.0  # most seconds to wait before choosing, so peers started together choose apart
    balance_period: float = 120.0  # mean seconds between rebalancing checks (randomised +-50%); 0: never move
    balance_min_improvement: float = 0.2  # move only if the swarm's weakest block gets this much faster (0.2: 20%)
    network_bandwidth: float = 100.0  # Mbit/s: caps the announced throughput at what the link carries
    output_noise: float = 0.0  # tests of clients' spot checks only: a faulty peer's noise on every output
    forward_noise: float = 0.0  # tests only: a faulty peer's noise on the outputs it forwards to the next peer
    # benchmarks only, as a slow network would: the round trip of an inference step with its client (half before it
    # runs, half before its reply), and of one forwarded from another peer (half before it runs), in seconds
    added_latency: float = 0.0
    added_peer_latency: float = 0.0

    @property
    def auto_blocks(self) -> bool:
        return self.start is None

    def __post_init__(self) -> None:
        if (self.start is None) != (self.end is None):
            raise ConfigError("give both ends of --blocks START:END, or neither to let the peer choose")
        if self.start is not None and self.end is not None and not 0 <= self.start < self.end:
            raise ConfigError(f"--blocks {self.start}:{self.end} must satisfy 0 <= start < end")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError("--num-blocks must be positive")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError("--memory-budget must be positive")
        if self.start_jitter < 0 or self.balance_period < 0 or self.balance_min_improvement < 0:
            raise ConfigError("--start-jitter, --balance-period and --balance-min-improvement must not be negative")
        if self.network_bandwidth <= 0:
            raise ConfigError("--network-bandwidth must be positive")
        if not self.initial_peers and not self.new_swarm:
            raise ConfigError("pass --initial-peers MULTIADDR to join a swarm, or --new-swarm to start one")
        for name in (
            "cache_tokens",
            "max_batch_size",
            "inference_max_length",
            "prefill_chunk_tokens",
            "max_sessions_per_client",
            "max_requests_per_client",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.max_message_bytes is not None and self.max_message_bytes <= 0:
            raise ConfigError("--max-message-bytes must be positive")
        if self.update_period <= 0 or self.session_idle_timeout <= 0:
            raise ConfigError("--update-period and --session-idle-timeout must be positive")
        if self.decode_gather_ms < 0:
            raise ConfigError("--decode-gather-ms must not be negative")
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout must not be negative")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError("--metrics-port must be between 0 and 65535")


def parse_blocks(text: str | None) -> tuple[int | None, int | None]:
    """'0:12' -> (0, 12): a half-open range, like a Python slice; None -> (None, None): the peer chooses."""
    if text is None:
        return None, None
    try:
        start_text, end_text = text.split(":")
        return int(start_text), int(end_text)
    except ValueError:
        raise ConfigError(f"--blocks must look like START:END (for example 0:12), got {text!r}") from None


def default_max_message_bytes(max_batch_size: int, inference_max_length: int, hidden_size: int) -> int:
    """Twice the largest legitimate request, so that no honest client is refused: a backward call carries hidden
    states and their gradients of up to [max_batch_size, inference_max_length, hidden_size] each, in float32 (the
    widest dtype clients send); the other half is room for its LoRA tensors and deep prompts. At least
    `MIN_DEFAULT_MESSAGE_BYTES`, for small models whose adapters can outweigh their activations."""
    backward_bytes = 2 * max_batch_size * inference_max_length * hidden_size * 4
    return max(2 * backward_bytes, MIN_DEFAULT_MESSAGE_BYTES)


def parse_size(text: str | None, flag: str = "--memory-budget") -> int | None:
    """'8GiB', '500MB', '1.5G', '1024' (bytes) -> bytes."""
    if text is None:
        return None
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
             "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}  # fmt: skip
    number = text.strip().lower().rstrip("abgikmt")
    unit = text.strip().lower()[len(number) :]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise ConfigError(f"{flag} must look like 8GiB, 500MB or a number of bytes, got {text!r}") from None
