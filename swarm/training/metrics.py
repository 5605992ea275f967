"""A trainer's Prometheus metrics: its loss, the run's epoch (averaging rounds), trainers in the run, throughput.

In prometheus_client's default registry, next to the swarm client's own metrics (time to first token, reroutes);
`swarm finetune --metrics-port N` serves them.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

NAMESPACE = "blockswarm_training"
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TrainingMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.loss = Gauge(f"{NAMESPACE}_loss", "Loss of this trainer's last local step", registry=registry)
        self.epoch = Gauge(
            f"{NAMESPACE}_epoch", "The run's epoch this trainer is at: averaged optimizer steps", registry=registry
        )
        self.epochs = Counter(
            f"{NAMESPACE}_epochs_total",
            "Averaging rounds this trainer took part in or caught up with (epochs it advanced)",
            registry=registry,
        )
        self.peers = Gauge(
            f"{NAMESPACE}_run_peers", "Trainers in the run, as its progress records say", registry=registry
        )
        self.tokens = Counter(f"{NAMESPACE}_tokens_total", "Tokens this trainer trained on", registry=registry)
        self.step_duration = Histogram(
            f"{NAMESPACE}_step_duration_seconds",
            "One local step: forward and backward through the swarm, and the optimizer (averaging rounds included)",
            buckets=STEP_BUCKETS,
            registry=registry,
        )

    def record_step(
        self, loss: float, tokens: int, seconds: float, epoch: int, epochs_advanced: int, peers: int
    ) -> None:
        self.loss.set(loss)
        self.tokens.inc(tokens)
        self.step_duration.observe(seconds)
        self.epoch.set(epoch)
        self.epochs.inc(epochs_advanced)
        self.peers.set(peers)
