"""A DHT from `start_dht` leaves no socket file in /tmp, even when hivemind has to stop its process the hard way,
and stopping one whose start failed leaves hivemind's shared update lock free."""

from __future__ import annotations

import multiprocessing
import signal
import time
from multiprocessing.synchronize import Event as EventType

from hivemind.utils.mpfuture import MPFuture

from swarm.dht import _end_failed_start, start_dht
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


def test_stopping_a_failed_start_never_leaves_hiveminds_update_lock_held() -> None:
    """A DHT process whose start failed has just sent its failure under `MPFuture._update_lock`, which every process
    forked from this one shares. Stopped while it still holds the lock, it would leave the lock held for good and
    every later DHT start in this process would hang. Here a forked process takes the lock, says so, and lets it go
    a moment later, as such a process does; `_end_failed_start` then stops it, and the lock must be free."""
    context = multiprocessing.get_context("fork")
    holding = context.Event()
    process = context.Process(target=_hold_the_update_lock_then_idle, args=(holding, 0.5), daemon=True)
    process.start()
    try:
        assert holding.wait(10)
        _end_failed_start(process, hivemind_socket_files())  # type: ignore[arg-type]  # what it uses of a DHT
        assert process.exitcode == -signal.SIGTERM
        assert MPFuture._update_lock.acquire(timeout=5)
        MPFuture._update_lock.release()
    finally:
        process.kill()
        process.join(5)


def _hold_the_update_lock_then_idle(holding: EventType, held_s: float) -> None:
    with MPFuture._update_lock:
        holding.set()
        time.sleep(held_s)
    time.sleep(60)  # a failed DHT process lives on until it is stopped
