"""`LocalSwarm`: a bootstrap node and peers on 127.0.0.1 as real subprocesses, for tests, the demo and benchmarks.

Every process runs in its own process group and is stopped by PID on `close()` (SIGTERM, then SIGKILL),
so no `p2pd` outlives the swarm.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from types import TracebackType

from swarm.process import SwarmProcess

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
INITIAL_PEERS_LINE = r"^--initial-peers (/ip4/127\.0\.0\.1/\S+)$"
SERVING_LINE = r"Serving blocks (\d+):(\d+)"
PEER_ID_LINE = r"reachable at: --initial-peers \S+/p2p/(\w+)"
METRICS_LINE = r"Metrics at (http://127\.0\.0\.1:\d+/metrics)"


class LocalSwarm:
    """`swarm-dht` plus one `swarm-peer` per span, all on loopback."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        spans: Sequence[tuple[int, int]],
        *,
        num_threads: int = 1,
        update_period: float = 5.0,  # records live 3 periods; shorter ones lapse while a stopped DHT node stalls
        peer_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout: float = 180.0,
        swarm_key: str | os.PathLike[str] | None = None,  # a private swarm: every process gets --swarm-key
    ):
        self.model = str(model)
        self.key_args = [] if swarm_key is None else ["--swarm-key", str(swarm_key)]
        self.num_threads = num_threads
        self.update_period = update_period
        self.peer_args = list(peer_args)
        self.env = {"OMP_NUM_THREADS": str(num_threads), "MKL_NUM_THREADS": str(num_threads), **(env or {})}
        self.start_timeout = start_timeout
        self.bootstrap: SwarmProcess | None = None
        self.peers: list[SwarmProcess] = []
        self.initial_peers: list[str] = []
        self._spans = list(spans)

    def start(self) -> LocalSwarm:
        """Start the bootstrap node and the peers, once (`with LocalSwarm(...)` starts it too); returns once every
        peer serves."""
        if self.bootstrap is not None:  # a second start would leave the first one's processes running
            raise RuntimeError("this LocalSwarm was started already")
        try:
            self.bootstrap = SwarmProcess(
                [sys.executable, "-m", "dht_bootstrap", "--host-maddrs", LOOPBACK, *self.key_args],
                env=self.env,
                name="swarm-dht",
            )
            match = self.bootstrap.wait_for_line(INITIAL_PEERS_LINE, self.start_timeout, stream="stdout")
            self.initial_peers = [match.group(1)]
            started = [self.add_peer(start, end, wait=False) for start, end in self._spans]
            for peer in started:
                peer.wait_for_line(SERVING_LINE, self.start_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def add_peer(self, start: int, end: int, *extra_args: str, wait: bool = True) -> SwarmProcess:
        """Start one more peer serving blocks [start, end); with `wait`, return once it serves."""
        return self._start_peer(["--blocks", f"{start}:{end}", *extra_args], f"swarm-peer[{start}:{end}]", wait)

    def add_auto_peer(self, *extra_args: str, name: str = "swarm-peer[auto]", wait: bool = True) -> SwarmProcess:
        """Start a peer without --blocks: it chooses its blocks (and may move); `served_span` tells which."""
        return self._start_peer(list(extra_args), name, wait)

    @staticmethod
    def served_span(peer: SwarmProcess, timeout: float = 60.0) -> tuple[int, int]:
        """The span a peer serves now: the last 'Serving blocks' line it logged (a move logs a new one)."""
        peer.wait_for_line(SERVING_LINE, timeout)
        start, end = re.findall(SERVING_LINE, peer.output())[-1]
        return int(start), int(end)

    def _start_peer(self, peer_args: list[str], name: str, wait: bool) -> SwarmProcess:
        args = [
            sys.executable, "-m", "peer", self.model,
            "--initial-peers", *self.initial_peers, "--host-maddrs", LOOPBACK,
            "--num-threads", str(self.num_threads), "--update-period", str(self.update_period),
            *self.key_args, *self.peer_args, *peer_args,
        ]  # fmt: skip
        peer = SwarmProcess(args, env=self.env, name=name)
        self.peers.append(peer)
        if wait:
            peer.wait_for_line(SERVING_LINE, self.start_timeout)
        return peer

    def peer_id(self, peer: SwarmProcess) -> str:
        """The full peer id a peer process logged at start."""
        return peer.wait_for_line(PEER_ID_LINE, self.start_timeout).group(1)

    def metrics_url(self, peer: SwarmProcess) -> str:
        """The URL of a peer's Prometheus metrics, logged at start by a peer given `--metrics-port`."""
        return peer.wait_for_line(METRICS_LINE, self.start_timeout).group(1)

    def process_of(self, peer_id: str) -> SwarmProcess:
        """The peer process with this peer id."""
        for peer in self.peers:
            if peer.returncode is None and self.peer_id(peer) == peer_id:
                return peer
        raise LookupError(f"no running peer has id {peer_id}")

    def close(self) -> None:
        """Stop every peer, then the bootstrap node; each by PID, escalating to SIGKILL of its group."""
        for process in [*self.peers, *([self.bootstrap] if self.bootstrap else [])]:
            process.terminate()

    def __enter__(self) -> LocalSwarm:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
