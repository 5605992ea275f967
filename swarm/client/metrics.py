"""What a client sees of the swarm, as Prometheus metrics: time to first token, inter-token latency, forwarded
steps, reroutes, spot checks.

They live in prometheus_client's default registry, as a library's metrics do: an application exports them with
`prometheus_client.start_http_server(port)` (or its own `/metrics` route, as the HTTP gateway does) and gets
them next to its own. Sessions record into them; nothing is exported unless the application asks.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

NAMESPACE = "blockswarm_client"

FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ClientMetrics:
    """Every client metric, registered in `registry`; `InferenceSession` records into them."""

    def __init__(self, registry: CollectorRegistry):
        self.sessions = Counter(f"{NAMESPACE}_inference_sessions_total", "Inference sessions opened", registry=registry)
        self.time_to_first_token = Histogram(
            f"{NAMESPACE}_time_to_first_token_seconds",
            "From a session's first step being sent to its output: route, opening every span, and the prompt",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            f"{NAMESPACE}_inter_token_seconds",
            "Between the outputs of consecutive one-token steps of a session, client-side work included",
            buckets=INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.forwarded_steps = Counter(
            f"{NAMESPACE}_forwarded_steps_total",
            "Steps a span's peer received from the previous span's peer instead of from this client",
            registry=registry,
        )
        self.reroutes = Counter(
            f"{NAMESPACE}_reroutes_total", "Failed spans replaced by other peers mid-session", registry=registry
        )
        self.verifications = Counter(
            f"{NAMESPACE}_verifications_total",
            "Spot checks of a peer's output against an independent peer, by outcome: agreed, peer_faulty "
            "(banned, step recomputed), verifier_faulty, inconclusive (no third source), unverifiable (no other peer)",
            ["outcome"],
            registry=registry,
        )


_lock = threading.Lock()
_default: ClientMetrics | None = None


def client_metrics() -> ClientMetrics:
    """The process's client metrics, in the default registry (created on first use: registering twice fails)."""
    global _default
    with _lock:
        if _default is None:
            _default = ClientMetrics(REGISTRY)
        return _default
