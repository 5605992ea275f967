"""A DHT from `start_dht` leaves no socket file in /tmp, even when hivemind has to stop its process the hard way,
and stopping one whose start failed leaves hivemind's shared update lock free."""

from __future__ import annotations

import multiprocessing
import signal
import time
from multiprocessing.synchronize import Event as EventType

from hivemind.utils.mpfuture import MPFuture

from swarm.dht import SwarmDHT, _end_failed_start, start_dht
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


def test_stopping_a_dht_process_never_leaves_hiveminds_update_lock_held() -> None:
    """A DHT process takes `MPFuture._update_lock`, which every process forked from this one shares, to send any
    result: a failed start sends its failure so, just before it is stopped. Stopped while it still holds the lock, it
    would leave it held for good and every later DHT start in this process would hang. Here a DHT process takes the
    lock, says so, and lets it go a moment later; `_end_failed_start` then stops it (`SwarmDHT.terminate`, which
    hivemind's stop the hard way calls too), and the lock must be free."""
    holding = multiprocessing.get_context("fork").Event()
    dht = _LockHoldingDHT(holding, held_s=0.5)
    dht.start()
    try:
        assert holding.wait(10)
        _end_failed_start(dht, hivemind_socket_files())
        assert dht.exitcode == -signal.SIGTERM
        assert MPFuture._update_lock.acquire(timeout=5)
        MPFuture._update_lock.release()
    finally:
        dht.kill()
        dht.join(5)


class _LockHoldingDHT(SwarmDHT):
    """A DHT whose process holds the update lock for `held_s` seconds, as one that sends its result does, then
    idles as a failed start's process does until it is stopped."""

    def __init__(self, holding: EventType, held_s: float) -> None:
        super().__init__(start=False)
        self.holding, self.held_s = holding, held_s

    def run(self) -> None:
        with MPFuture._update_lock:
            self.holding.set()
            time.sleep(self.held_s)
        time.sleep(60)
