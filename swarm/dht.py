"""`start_dht`: a hivemind DHT that checks server records' signatures, whose forked process leaves Ctrl-C to its
owner, and which leaves no socket file in /tmp, whether its start fails or hivemind has to stop it the hard way
(`SwarmDHT`).

Ctrl-C in a terminal sends SIGINT to the whole process group. If the DHT process died with its owner, the owner
could no longer announce itself offline on the way out; so the DHT process ignores SIGINT (hivemind's choice; we
hold SIGINT back while it forks, until it has) and the owner shuts it down with `dht.shutdown()`, which also stops
its `p2pd`.
SIGTERM stays deliverable: hivemind's own hard shutdown of a stuck DHT process relies on it.

hivemind shares memory between its processes through torch's `file_system` strategy, whose first use in a process
starts a `torch_shm_manager` and waits for it, for about 0.2 s. Until it has a session of its own, that manager is in
our process group: a Ctrl-C meanwhile killed it, and the waiting share then spun forever at full CPU, with the peers
its owner had started left running. `start_shared_memory_manager` starts it first, with Ctrl-C and SIGTERM blocked,
a mask the manager keeps (it exits by itself once the processes it serves are gone).

p2pd binds with SO_REUSEPORT, so two processes on one fixed port would both start and silently split incoming
connections; `LIBP2P_TCP_REUSEPORT=false` (unless set otherwise) makes the second one fail to start instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hivemind
import torch
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.mpfuture import MPFuture

from swarm.errors import ConfigError
from swarm.process import descendants, hivemind_socket_files, hivemind_sockets, remove_stale_hivemind_sockets
from swarm.signed_records import ServerRecordValidator
from swarm.swarm_key import SwarmKey, SwarmKeyAuthorizer

_OWNER_SIGNALS = (signal.SIGINT,)
DAEMON_EXIT_SECONDS = 5.0  # the longest wait for an ending DHT process's p2pd to let go of its socket file


def start_dht(
    initial_peers: Sequence[str],
    *,
    signing_key: bytes | None = None,
    swarm_key: SwarmKey | None = None,
    **kwargs: Any,
) -> SwarmDHT:
    """A started DHT node that validates server records (swarm/signed_records.py); with `signing_key` (a peer's
    RSA identity key, DER) it signs its own. With `swarm_key` it talks only to members of that private swarm
    (swarm/swarm_key.py)."""
    os.environ.setdefault("LIBP2P_TCP_REUSEPORT", "false")  # read by the p2pd the DHT starts
    start_shared_memory_manager()
    validators = [ServerRecordValidator(signing_key)]
    authorizer = None if swarm_key is None else SwarmKeyAuthorizer(swarm_key)
    dht, failure = None, None
    sockets_before = hivemind_socket_files()
    with _ctrl_c_held() as held:
        try:
            dht = SwarmDHT(
                initial_peers=list(initial_peers),
                start=False,
                record_validators=validators,
                authorizer=authorizer,
                **kwargs,
            )
            dht.run_in_background(await_ready=True)
        except (P2PDaemonError, RuntimeError) as e:
            failure = e
    if failure is not None and dht is not None:
        _end_failed_start(dht, sockets_before)
    if held:  # Ctrl-C came while the DHT started: stop it cleanly, then take the Ctrl-C as it came
        if dht is not None and failure is None:
            dht.shutdown()
        signal.raise_signal(held[0])  # before any failure: Ctrl-C kills a p2pd that is starting
    if failure is not None:
        error = _join_error(failure, initial_peers, swarm_key)
        if error is failure:
            raise failure
        raise error from failure
    assert dht is not None
    return dht


class SwarmDHT(hivemind.DHT):
    """hivemind's DHT, whose shutdown leaves no socket file in /tmp.

    hivemind stops a DHT process that has not ended within its grace period (`shutdown_timeout`) with SIGTERM, and
    its p2pd then dies without removing its socket file. A trainer's DHT process goes that way at random: at their
    shutdown, hivemind's averager processes send it requests and end, and it cannot read those requests any more
    (it fails to fetch the connection each carries from the process that has ended), then sleeps, missing its grace
    period."""

    def shutdown(self) -> None:
        processes = [self.pid, *(info.pid for info in descendants(self.pid))] if self.is_alive() else []
        sockets = hivemind_sockets(processes)  # the daemon's and the DHT process's, while they are open
        super().shutdown()
        # not `removing_hivemind_sockets`: after a hard stop the p2pd outlives the DHT process for a moment, and
        # waiting until it has let go of its socket also waits until it has ended
        remove_stale_hivemind_sockets(sockets, DAEMON_EXIT_SECONDS)

    def terminate(self) -> None:
        """Stop the process with SIGTERM (after a failed start, and hivemind's own stop the hard way), while this
        process holds hivemind's `MPFuture._update_lock`, and wait for it to end. Every process forked from this one
        shares that lock, and a DHT process takes it to send any result, a failed start's included: killed while
        holding it, it would leave it held for good, and every later DHT start here would hang (seen in CI, after
        refused starts)."""
        with MPFuture._update_lock:
            super().terminate()
            self.join(DAEMON_EXIT_SECONDS)


def _end_failed_start(dht: SwarmDHT, sockets_before: set[Path]) -> None:
    """End the process of a DHT whose start failed, and its p2pd, and remove the socket file that p2pd leaves.

    The process may live on after the failure, its event loop still running (seen under pytest), and its p2pd with
    it: in a program that retries, each failed join would leave both. Once the process has ended, its p2pd dies
    without removing its socket file. (The start failed: `SwarmDHT.shutdown` cannot talk to the process.)"""
    dht.terminate()
    remove_stale_hivemind_sockets(hivemind_socket_files() - sockets_before, DAEMON_EXIT_SECONDS)


def _join_error(error: Exception, initial_peers: Sequence[str], swarm_key: SwarmKey | None) -> Exception:
    """What a failed start of the DHT tells the user: a ConfigError when the swarm could not be joined, else the
    error itself."""
    if isinstance(error, P2PDaemonError):
        return ConfigError(f"could not join the swarm through --initial-peers {' '.join(initial_peers)}: {error}")
    if "bootstrap failed" not in str(error):
        return error
    hint = (
        " (is --swarm-key this swarm's key?)"
        if swarm_key is not None
        else " (are they running? a private swarm answers only members: pass its --swarm-key)"
    )
    return ConfigError(f"could not join the swarm: none of --initial-peers {' '.join(initial_peers)} answered{hint}")


_manager_started_by: int | None = None  # the process that started its shared-memory manager here


def start_shared_memory_manager() -> None:
    """Start this process's `torch_shm_manager`, which hivemind's first inter-process future would start, with
    SIGINT and SIGTERM blocked so that neither kills it (module doc). The signals are blocked in this thread only
    while it starts; one that comes meanwhile is delivered once it has."""
    global _manager_started_by
    if _manager_started_by == os.getpid() or torch.multiprocessing.get_sharing_strategy() != "file_system":
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        torch.empty(1).share_memory_()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    _manager_started_by = os.getpid()


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[list[int]]:
    """Hold Ctrl-C back while hivemind forks and starts the DHT's process, and list what came.

    The forked process inherits our handlers until hivemind ignores Ctrl-C there (its owner stops it), and a Ctrl-C
    that reached it first would kill it with a traceback. Merely ignoring Ctrl-C meanwhile would lose one meant for
    us: a demo stopped while its client joins the swarm would go on to the end."""
    held: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in _OWNER_SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:  # an ignored Ctrl-C (a background job) stays ignored, and is not held
            signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
