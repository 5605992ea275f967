"""A DHT from `start_dht` leaves no socket file in /tmp, even when hivemind has to stop its process the hard way."""

from __future__ import annotations

from swarm.dht import start_dht
from swarm.process import descendants, hivemind_socket_files
from swarm.testing import LOOPBACK


def test_a_dht_stopped_the_hard_way_leaves_no_socket_file() -> None:
    """hivemind stops a DHT process that outlives its grace period with SIGTERM, and its p2pd then dies without
    removing its socket file (a trainer's DHT goes that way at random, see `SwarmDHT`). With no grace period at all,
    every shutdown does."""
    before = hivemind_socket_files()
    dht = start_dht([], host_maddrs=[LOOPBACK], shutdown_timeout=0)
    processes = descendants(dht.pid)
    assert [info.name for info in processes] == ["p2pd"]
    assert hivemind_socket_files() - before  # the daemon's and the DHT process's own
    dht.shutdown()
    assert hivemind_socket_files() - before == set()
    dht.join(10)  # stopped the hard way, which does not wait for the process
    assert dht.exitcode is not None and not any(info.is_running() for info in processes)
