"""`swarm-dht` as users run it: a real subprocess on 127.0.0.1, joined by real hivemind DHTs."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hivemind
import pytest
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarm.dht import start_dht
from swarm.process import ProcessInfo, SwarmProcess, descendants, read_process

SWARM_DHT = Path(sys.executable).parent / "swarm-dht"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
INITIAL_PEERS_LINE = r"^--initial-peers (/ip4/127\.0\.0\.1/tcp/\d+/p2p/(\w+))$"
START_TIMEOUT = 60.0  # importing torch and hivemind on a busy 2-core machine takes a while
STOP_TIMEOUT = 15.0  # dht.shutdown() waits up to 3 s for the DHT process, then terminates it

pytestmark = pytest.mark.slow

StartBootstrap = Callable[..., SwarmProcess]


@pytest.fixture
def start_bootstrap() -> Iterator[StartBootstrap]:
    """Starts `swarm-dht` on loopback with extra flags; kills each process group by pid at teardown."""
    started: list[SwarmProcess] = []

    def start(*flags: str) -> SwarmProcess:
        process = SwarmProcess([SWARM_DHT, "--host-maddrs", LOOPBACK, *flags], env={"OMP_NUM_THREADS": "1"})
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()


def wait_for_initial_peer(process: SwarmProcess) -> tuple[str, str]:
    """The multiaddr and peer id from the `--initial-peers` line on its stdout."""
    match = process.wait_for_line(INITIAL_PEERS_LINE, timeout=START_TIMEOUT, stream="stdout")
    return match.group(1), match.group(2)


def wait_for_descendant(process: SwarmProcess, name: str) -> list[ProcessInfo]:
    """Polls without a pause (what follows must happen within a start-up's fraction of a second) until a process
    named `name` runs below `process`; returns the process tree then."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        tree = descendants(process.pid)
        if any(info.name == name for info in tree):
            return tree
        assert time.monotonic() < deadline and process.returncode is None, process.output()


def wait_until_gone(processes: list[ProcessInfo], timeout: float) -> list[ProcessInfo]:
    """Waits until none of `processes` runs any more; returns those still running at the deadline."""
    deadline = time.monotonic() + timeout
    while (running := [info for info in processes if info.is_running()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running


def test_initial_peers_line_lets_dhts_store_and_get_through_it(start_bootstrap: StartBootstrap) -> None:
    maddr, _ = wait_for_initial_peer(start_bootstrap())

    clients: list[hivemind.DHT] = []
    try:
        for _ in range(2):
            clients.append(hivemind.DHT(initial_peers=[maddr], client_mode=True, host_maddrs=[LOOPBACK], start=True))
        writer, reader = clients
        assert writer.store("bootstrap-test", "hello", expiration_time=get_dht_time() + 60)
        # The clients serve nothing, so the value can only come back from the bootstrap node.
        found = reader.get("bootstrap-test", latest=True)
        assert found is not None and found.value == "hello"
    finally:
        for client in clients:
            client.shutdown()


def test_identity_file_is_created_and_keeps_the_peer_id(start_bootstrap: StartBootstrap, tmp_path: Path) -> None:
    identity = tmp_path / "keys" / "bootstrap.id"  # the folder does not exist yet either

    first = start_bootstrap("--identity-path", str(identity))
    _, first_peer_id = wait_for_initial_peer(first)
    assert identity.is_file()
    assert PeerID.from_identity(identity.read_bytes()).to_base58() == first_peer_id
    assert first.terminate(STOP_TIMEOUT) == 0

    second = start_bootstrap("--identity_path", str(identity))  # the underscore alias works too
    _, second_peer_id = wait_for_initial_peer(second)
    assert second_peer_id == first_peer_id


def test_port_in_use_fails_the_start(start_bootstrap: StartBootstrap) -> None:
    """p2pd would share a taken port through SO_REUSEPORT; swarm-dht turns that off so the address stays unique."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    maddr = f"/ip4/127.0.0.1/tcp/{port}"
    wait_for_initial_peer(start_bootstrap("--host-maddrs", maddr))

    second = start_bootstrap("--host-maddrs", maddr)
    assert second.wait(START_TIMEOUT) == 1
    assert "address already in use" in second.output("stderr")
    assert second.lines("stdout") == []


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("target", ["process", "group"])
def test_signal_shuts_down_cleanly(start_bootstrap: StartBootstrap, signal_number: int, target: str) -> None:
    """`kill PID` or a signal to the whole group (Ctrl-C, service managers): exit 0 and leave no p2pd behind."""
    process = start_bootstrap()
    wait_for_initial_peer(process)
    tree = descendants(process.pid)
    assert any(info.name == "p2pd" for info in tree), f"expected a p2pd below swarm-dht, found {tree}"

    if target == "process":
        process.send_signal(signal_number)
    else:
        process.signal_group(signal_number)
    assert process.wait(STOP_TIMEOUT) == 0, process.output()
    assert wait_until_gone(tree, timeout=5.0) == []
    assert "shutting down" in process.output("stderr")


def test_a_killed_node_leaves_no_socket_files(start_bootstrap: StartBootstrap) -> None:
    """SIGKILL gives hivemind no chance to remove the unix sockets of its `p2pd` (and of the daemon's client, where
    it serves streams) in /tmp; `SwarmProcess` removes those of the group it kills (the fault-tolerance tests kill
    peers so, by the dozen)."""
    before = set(Path("/tmp").glob("hivemind-*.sock"))
    process = start_bootstrap()
    wait_for_initial_peer(process)
    tree = descendants(process.pid)
    created = set(Path("/tmp").glob("hivemind-*.sock")) - before
    assert any(path.name.startswith("hivemind-p2pd-") for path in created), created  # its daemon's socket

    process.kill()
    assert wait_until_gone(tree, timeout=5.0) == []
    assert [path for path in created if path.exists()] == []


def test_sigusr1_prints_every_threads_stack_and_the_node_serves_on(start_bootstrap: StartBootstrap) -> None:
    """`kill -USR1 PID` shows where a stuck process is (every entry point sets it up with its logging): the stacks
    of all its threads on stderr, and the process goes on."""
    process = start_bootstrap()
    maddr, _ = wait_for_initial_peer(process)
    os.kill(process.pid, signal.SIGUSR1)
    process.wait_for_line(r"^Current thread 0x[0-9a-f]+ \(most recent call first\):$", timeout=10.0, stream="stderr")
    assert process.returncode is None

    client = hivemind.DHT(initial_peers=[maddr], client_mode=True, host_maddrs=[LOOPBACK], start=True)
    try:
        assert client.store("after-sigusr1", "still serving", expiration_time=get_dht_time() + 60)
    finally:
        client.shutdown()


def test_ctrl_c_while_a_dht_starts_stops_it_then_interrupts(start_bootstrap: StartBootstrap) -> None:
    """Ctrl-C while `start_dht` forks and joins (a demo stopped as its client connects) is held until the DHT is up,
    then the DHT is shut down and the Ctrl-C raised: it is neither lost nor leaves a p2pd behind."""
    maddr, _ = wait_for_initial_peer(start_bootstrap())
    p2pds_before = {info.pid for info in running_p2pds()}
    ctrl_c = threading.Thread(target=press_ctrl_c_once_held, args=(signal.getsignal(signal.SIGINT),), daemon=True)
    ctrl_c.start()
    with pytest.raises(KeyboardInterrupt):
        start_dht([maddr], host_maddrs=[LOOPBACK])
    ctrl_c.join(timeout=5.0)
    assert not ctrl_c.is_alive()
    assert multiprocessing.active_children() == []
    assert [info for info in running_p2pds() if info.pid not in p2pds_before] == []


SHARES_UNTIL_INTERRUPTED = """
import sys, time
import torch
from swarm.dht import start_shared_memory_manager
torch.multiprocessing.set_sharing_strategy("file_system")  # hivemind's, set when it is imported
print("sharing", flush=True)
try:
    start_shared_memory_manager()
    torch.empty(1).share_memory_()  # as hivemind's next inter-process future
    time.sleep(60)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_while_the_shared_memory_manager_starts_interrupts(attempt: int) -> None:
    """Ctrl-C reaches the whole process group, torch's shared-memory manager too while it starts, before it makes a
    session of its own. It used to die there, and the share waiting for it spun forever at full CPU: a client
    interrupted as it joined the swarm hung (7 of 10 tries with Ctrl-C as soon as the manager appeared). Now the
    process is interrupted, and its further shares work. Ctrl-C goes out the moment the manager exists."""
    process = SwarmProcess([sys.executable, "-c", SHARES_UNTIL_INTERRUPTED], env={"OMP_NUM_THREADS": "1"})
    try:
        process.wait_for_line("^sharing$", timeout=START_TIMEOUT, stream="stdout")
        wait_for_descendant(process, "torch_shm_manag")  # the kernel keeps 15 characters of a name
        process.signal_group(signal.SIGINT)
        assert process.wait(STOP_TIMEOUT) == 0, process.output()
    finally:
        process.kill()
    assert process.lines("stdout") == ["sharing", "interrupted"]


JOINS_UNTIL_INTERRUPTED = """
import sys
from swarm.dht import start_dht
print("joining", flush=True)
try:
    start_dht([sys.argv[1]], host_maddrs=["/ip4/127.0.0.1/tcp/0"]).shutdown()
except KeyboardInterrupt:
    print("interrupted", flush=True)
except Exception as e:
    print(f"failed: {e}", flush=True)
else:
    print("joined", flush=True)
"""


def test_ctrl_c_that_kills_a_starting_p2pd_interrupts(start_bootstrap: StartBootstrap) -> None:
    """Ctrl-C to the group as soon as the joining DHT's p2pd exists: it may kill that p2pd before it is up, and the
    DHT's start then fails, but the user pressed Ctrl-C: the process is interrupted, not told it could not join."""
    maddr, _ = wait_for_initial_peer(start_bootstrap())
    process = SwarmProcess([sys.executable, "-c", JOINS_UNTIL_INTERRUPTED, maddr], env={"OMP_NUM_THREADS": "1"})
    try:
        process.wait_for_line("^joining$", timeout=START_TIMEOUT, stream="stdout")
        tree = wait_for_descendant(process, "p2pd")
        process.signal_group(signal.SIGINT)
        assert process.wait(STOP_TIMEOUT) == 0, process.output()
    finally:
        process.kill()
    assert process.lines("stdout") == ["joining", "interrupted"]
    assert wait_until_gone(tree, timeout=5.0) == []


def press_ctrl_c_once_held(unheld: object) -> None:
    """SIGINT to this process as soon as `start_dht` holds it back, i.e. while it starts the DHT."""
    while signal.getsignal(signal.SIGINT) is unheld:
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGINT)


def running_p2pds() -> list[ProcessInfo]:
    """The p2pds below this process, and orphaned ones (adopted by init): not those of other programs' processes."""
    ours = {os.getpid(), *(info.pid for info in descendants(os.getpid()))}
    found = (read_process(int(entry.name)) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [
        info
        for info in found
        if info is not None and info.name == "p2pd" and info.is_running() and (info.ppid == 1 or info.ppid in ours)
    ]
