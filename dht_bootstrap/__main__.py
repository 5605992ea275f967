"""swarm-dht: run a bootstrap DHT node and print the `--initial-peers` lines that let others join it.

stdout carries only those lines, one per visible multiaddr, so scripts and tests can parse them:

    --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/QmXyz...

Logs go to stderr. SIGINT and SIGTERM shut the DHT down, so that its forked process and that process's p2pd are
gone before we exit 0. Exit code 1: the DHT could not start, or its process died; 2: unusable settings.

p2pd binds its ports with SO_REUSEPORT, so a second node on a taken port would start and quietly get half of the
incoming connections. The bootstrap address must be unambiguous, so we turn that off (LIBP2P_TCP_REUSEPORT=false,
read by go-libp2p; set it in the environment to override) and a taken port fails the start instead.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TypeVar

import configargparse
import hivemind
from hivemind.dht import DHTNode
from hivemind.utils.multiaddr import Multiaddr

from swarm.command_line import command_parser
from swarm.dht import SwarmDHT, start_shared_memory_manager
from swarm.errors import ConfigError
from swarm.logs import setup_logging
from swarm.signed_records import ServerRecordValidator
from swarm.swarm_key import SwarmKey, SwarmKeyAuthorizer

logger = logging.getLogger(__name__)

DEFAULT_HOST_MADDR = "/ip4/0.0.0.0/tcp/31337"
DHT_LIVENESS_CHECK_PERIOD = 1.0  # seconds between checks that the DHT process still runs while we wait on it

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BootstrapConfig:
    """Everything `swarm-dht` needs, validated before any process starts."""

    host_maddrs: tuple[str, ...] = (DEFAULT_HOST_MADDR,)  # where to listen; port 0 picks a free one
    announce_maddrs: tuple[str, ...] = ()  # addresses to advertise instead of the listening ones (NAT, proxies)
    identity_path: Path | None = None  # private key file; created if missing; keeps the peer id across restarts
    initial_peers: tuple[str, ...] = ()  # other bootstrap nodes to join, so that several can back each other up
    refresh_period: float = 30.0  # routing-table buckets not updated for this many seconds get refreshed
    swarm_key: SwarmKey | None = None  # a private swarm's key (swarm/swarm_key.py): only members may use this node

    def __post_init__(self) -> None:
        if not self.host_maddrs:
            raise ConfigError("--host-maddrs needs at least one multiaddr, e.g. /ip4/0.0.0.0/tcp/31337")
        for maddr in (*self.host_maddrs, *self.announce_maddrs, *self.initial_peers):
            try:
                Multiaddr(maddr)
            except ValueError as e:
                raise ConfigError(f"{maddr!r} is not a multiaddr: {e}") from e
        if self.refresh_period <= 0:
            raise ConfigError(f"--refresh-period must be positive, got {self.refresh_period}")


def build_parser() -> configargparse.ArgumentParser:
    parser = command_parser(
        "swarm-dht", "Run a bootstrap DHT node for a blockswarm swarm and print its --initial-peers multiaddrs."
    )
    parser.add_argument(
        "--host-maddrs",
        "--host_maddrs",
        nargs="+",
        default=[DEFAULT_HOST_MADDR],
        help="multiaddrs to listen on; /tcp/0 picks a free port",
    )
    parser.add_argument(
        "--announce-maddrs",
        "--announce_maddrs",
        nargs="+",
        default=[],
        help="multiaddrs to advertise to other peers instead of the listening ones (explicit ports only)",
    )
    parser.add_argument(
        "--identity-path",
        "--identity_path",
        type=Path,
        help="private key file that fixes the peer id; a new one is written there if it does not exist",
    )
    parser.add_argument(
        "--initial-peers",
        "--initial_peers",
        nargs="+",
        default=[],
        help="multiaddrs of other bootstrap nodes to join",
    )
    parser.add_argument(
        "--swarm-key",
        "--swarm_key",
        metavar="FILE",
        help="serve only the private swarm of this key file (`swarm new-key FILE` writes one)",
    )
    parser.add_argument(
        "--refresh-period",
        "--refresh_period",
        type=float,
        default=30.0,
        help="refresh routing-table buckets that have not been updated for this many seconds",
    )
    return parser


def parse_config(argv: Sequence[str] | None = None) -> BootstrapConfig:
    """CLI > BLOCKSWARM_* environment > --config YAML > defaults; exits with a usage error if the result cannot work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = BootstrapConfig(
            host_maddrs=tuple(args.host_maddrs),
            announce_maddrs=tuple(args.announce_maddrs),
            identity_path=args.identity_path,
            initial_peers=tuple(args.initial_peers),
            refresh_period=args.refresh_period,
            swarm_key=None if args.swarm_key is None else SwarmKey.load(args.swarm_key),
        )
    except ConfigError as e:
        parser.error(str(e))
    logger.info("Settings:\n%s", parser.format_values().rstrip())
    return config


class StopSignal:
    """Records SIGINT and SIGTERM and makes them readable on a socket, so the main loop can wait for a signal together
    with the DHT process's exit (`multiprocessing.connection.wait([stop, dht.sentinel])`).

    The handler only records; the signal wake-up fd makes the socket readable. (Setting a threading.Event from a
    handler can deadlock if the signal lands while the main thread holds the Event's lock.) Processes forked later,
    hivemind's DHT among them, get the default handlers back, so a signal sent to the whole process group stops
    them as if we had never installed ours.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno())
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signal_number, self._record)
        os.register_at_fork(after_in_child=_restore_default_signal_handling)

    def fileno(self) -> int:
        return self._reader.fileno()

    def _record(self, signal_number: int, _frame: FrameType | None) -> None:
        self.signal_number = signal_number


def _restore_default_signal_handling() -> None:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


async def _visible_maddrs(_dht: hivemind.DHT, node: DHTNode) -> list[Multiaddr]:
    """Runs inside the DHT process; module-level so that it pickles by name."""
    return await node.get_visible_maddrs()


def _wait_for_dht(dht: hivemind.DHT, wait: Callable[[float], T]) -> T:
    """`wait(timeout)`, retried while the DHT process lives: hivemind waits forever for a process that has died."""
    while True:
        try:
            return wait(DHT_LIVENESS_CHECK_PERIOD)
        except concurrent.futures.TimeoutError:
            if not dht.is_alive():
                raise RuntimeError(f"the DHT process exited with code {dht.exitcode}") from None


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    config = parse_config(argv)
    stop = StopSignal()  # before the DHT starts, so that a signal during start-up still ends in dht.shutdown()
    os.environ.setdefault("LIBP2P_TCP_REUSEPORT", "false")  # inherited by p2pd: a taken port is an error
    start_shared_memory_manager()  # before hivemind's first inter-process future (swarm/dht.py)
    if config.identity_path is not None and not config.identity_path.exists():
        logger.info("Writing a new identity to %s", config.identity_path)
        config.identity_path.parent.mkdir(parents=True, exist_ok=True)

    dht = SwarmDHT(  # its shutdown leaves no socket file
        initial_peers=list(config.initial_peers) or None,
        host_maddrs=list(config.host_maddrs),
        announce_maddrs=list(config.announce_maddrs) or None,
        identity_path=None if config.identity_path is None else str(config.identity_path),
        refresh_timeout=config.refresh_period,  # DHTNode re-walks routing-table buckets this stale, in the background
        record_validators=[ServerRecordValidator()],  # stores and serves only well-signed server records
        authorizer=None if config.swarm_key is None else SwarmKeyAuthorizer(config.swarm_key),
        start=False,
    )
    try:
        try:
            dht.run_in_background(await_ready=False)
            _wait_for_dht(dht, dht.wait_until_ready)
            maddrs = _wait_for_dht(dht, dht.run_coroutine(_visible_maddrs, return_future=True).result)
        except Exception as e:
            if stop.signal_number is None:  # else a signal to our process group ended the start-up: as asked
                logger.error("Could not start the DHT node: %s", e)
                return 1
        else:
            for maddr in maddrs:
                print(f"--initial-peers {maddr}", flush=True)
            logger.info("DHT node is up; peers join with --initial-peers %s", " ".join(map(str, maddrs)))
            multiprocessing.connection.wait([stop, dht.sentinel])

        if stop.signal_number is None:
            logger.error("The DHT process exited with code %s; stopping", dht.exitcode)
            return 1
        logger.info("Caught %s, shutting down", signal.Signals(stop.signal_number).name)
        return 0
    finally:
        dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
