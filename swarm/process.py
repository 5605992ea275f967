"""Run swarm commands (`swarm-dht`, `swarm-peer`, ...) as subprocesses that can always be stopped completely.

Used by tests, the demo and benchmarks. A swarm command forks: hivemind's DHT runs in a forked process, which
starts a `p2pd` binary. Signalling only the command's own pid can leave those running as orphans, so `SwarmProcess`
starts every command in a new session (its own process group) and stops the whole group:

    with SwarmProcess([swarm_dht, "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]) as dht:
        match = dht.wait_for_line(r"^--initial-peers (\\S+)$", timeout=60, stream="stdout")
        ...
    # leaving the block sends SIGTERM to the command, then SIGKILL to whatever is left in its group

`descendants(pid)` lists a process tree from /proc (Linux only), so a test can check that nothing outlived it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

Stream = Literal["stdout", "stderr"]

OUTPUT_TAIL_LINES = 40  # lines of output quoted in errors
EXIT_DRAIN_SECONDS = 1.0  # after the process exits, how long its last lines may take to arrive
HIVEMIND_SOCKET_PREFIX = "/tmp/hivemind-"  # hivemind's p2pd-*.sock and p2pclient-*.sock
STALE_SOCKET_POLL_SECONDS = 0.05  # how often `remove_stale_hivemind_sockets` looks again at bound socket files


class ProcessExitedError(RuntimeError):
    """The process ended before printing the line a caller was waiting for."""


@dataclass(frozen=True, slots=True)
class _Line:
    stream: Stream
    text: str


class SwarmProcess:
    """A command running in its own process group, with its stdout and stderr lines kept in memory.

    The process starts in the constructor. `env` adds to (and overrides) this process's environment;
    PYTHONUNBUFFERED=1 is set so that Python children print their lines as they go.
    """

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or Path(args[0]).name
        self._lines: list[_Line] = []
        self._changed = threading.Condition()
        self._popen = subprocess.Popen(
            [os.fspath(arg) for arg in args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
            start_new_session=True,  # pid == process group id, shared by the forked DHT and its p2pd
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        assert self._popen.stdout is not None and self._popen.stderr is not None  # both are PIPE
        self._readers = [
            threading.Thread(target=self._read, args=(pipe, stream), name=f"{self.name}-{stream}", daemon=True)
            for pipe, stream in ((self._popen.stdout, "stdout"), (self._popen.stderr, "stderr"))
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        """The command's pid, which is also its process group id."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the command has exited (negative: killed by that signal), else None."""
        return self._popen.poll()

    def lines(self, stream: Stream | None = None) -> list[str]:
        """Lines printed so far, without line endings; both streams in arrival order unless `stream` is given."""
        with self._changed:
            return [line.text for line in self._lines if stream is None or line.stream == stream]

    def output(self, stream: Stream | None = None) -> str:
        return "\n".join(self.lines(stream))

    def wait_for_line(
        self, pattern: re.Pattern[str] | str, timeout: float, *, stream: Stream | None = None
    ) -> re.Match[str]:
        """The first line so far or to come that `pattern` matches (`re.search`).

        Raises ProcessExitedError if the command exits without printing one, TimeoutError after `timeout` seconds;
        both quote the tail of the output.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        exited_at: float | None = None
        checked = 0
        with self._changed:
            while True:
                for line in self._lines[checked:]:
                    if (stream is None or line.stream == stream) and (match := regex.search(line.text)):
                        return match
                checked = len(self._lines)
                if exited_at is None and self._popen.poll() is not None:
                    exited_at = time.monotonic()
                # Once it has exited, read what is still in the pipes; a forked child may hold them open, though.
                drained = not any(reader.is_alive() for reader in self._readers)
                if exited_at is not None and (drained or time.monotonic() - exited_at > EXIT_DRAIN_SECONDS):
                    raise ProcessExitedError(
                        f"{self.name} exited with code {self._popen.returncode} before printing a line matching "
                        f"{regex.pattern!r}{self._tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self.name} printed no line matching {regex.pattern!r} in {timeout}s{self._tail()}"
                    )
                self._changed.wait(min(left, 0.1))  # an exit does not notify the condition, so look again soon

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the command itself to exit and return its exit code; raises subprocess.TimeoutExpired."""
        return self._popen.wait(timeout)

    def send_signal(self, signal_number: int) -> None:
        """Signal the command's own process only, as `kill PID` would."""
        if self._popen.poll() is None:
            os.kill(self.pid, signal_number)

    def signal_group(self, signal_number: int) -> None:
        """Signal every process in the group, as Ctrl-C in a terminal or a service manager would. A SIGKILL also
        removes the unix sockets that the group's `p2pd` daemons and their clients listened on, which processes
        killed that way cannot remove themselves."""
        killed = [self.pid, *(info.pid for info in descendants(self.pid))] if signal_number == signal.SIGKILL else []
        with removing_hivemind_sockets(killed):
            # The group outlives its leader while any member runs, and Linux hands out no pid still in use as a group
            # id. Once the group is empty, ESRCH (unless a new process got this very pid and leads a group: not in
            # practice).
            try:
                os.killpg(self.pid, signal_number)
            except ProcessLookupError:
                pass

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM to the command itself, so it can shut its own children down in order; after `timeout` seconds,
        SIGKILL to the group. Whatever is still left in the group afterwards is killed too."""
        self.send_signal(signal.SIGTERM)
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self._popen.wait()
        self.signal_group(signal.SIGKILL)
        return self._popen.returncode

    def kill(self) -> int:
        """SIGKILL to the whole process group."""
        self.signal_group(signal.SIGKILL)
        return self._popen.wait()

    def __enter__(self) -> SwarmProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return f"<SwarmProcess {self.name} pid={self.pid} returncode={self.returncode}>"

    def _read(self, pipe: IO[str], stream: Stream) -> None:
        with pipe:
            for text in pipe:
                with self._changed:
                    self._lines.append(_Line(stream, text.rstrip("\r\n")))
                    self._changed.notify_all()

    def _tail(self) -> str:
        tail = [line.text for line in self._lines[-OUTPUT_TAIL_LINES:]]
        return f"; last {len(tail)} lines of output:\n" + "\n".join(tail) if tail else "; it printed nothing"


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One process as /proc/PID/stat describes it; `start_ticks` tells it apart from a later one with the same pid."""

    pid: int
    ppid: int
    name: str  # the kernel's command name (comm), at most 15 characters, e.g. "p2pd"
    state: str
    start_ticks: int

    def is_running(self) -> bool:
        """True while this very process exists and is not a zombie."""
        current = read_process(self.pid)
        return current is not None and current.start_ticks == self.start_ticks and current.state not in ("Z", "X")


def read_process(pid: int) -> ProcessInfo | None:
    """The process with this pid, or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) state ppid ..."; comm may contain spaces and parentheses, so split around the last ")".
    head, _, rest = stat.rpartition(")")
    fields = rest.split()
    return ProcessInfo(
        pid=pid,
        ppid=int(fields[1]),
        name=head.partition("(")[2],
        state=fields[0],
        start_ticks=int(fields[19]),
    )


def descendants(pid: int) -> list[ProcessInfo]:
    """Every process below `pid` in the process tree (children, their children, ...), ordered by pid.

    A process whose parent died is adopted by init (or a subreaper) and no longer counts; list descendants while
    the tree is intact, then check `is_running()` on each.
    """
    children: dict[int, list[ProcessInfo]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := read_process(int(entry.name))) is not None:
            children.setdefault(info.ppid, []).append(info)
    found: list[ProcessInfo] = []
    parents = [pid]
    while parents:
        for child in children.get(parents.pop(), []):
            found.append(child)
            parents.append(child.pid)
    return sorted(found, key=lambda info: info.pid)


@contextlib.contextmanager
def removing_hivemind_sockets(pids: Sequence[int]) -> Iterator[None]:
    """Around a block that ends these processes in a way that leaves their socket files behind (SIGKILL; hivemind's
    averagers, which never close their p2p client): the hivemind sockets they hold open are read before the block,
    while the processes and their open files still exist, and removed after it."""
    sockets = hivemind_sockets(pids) if pids else []
    yield
    for path in sockets:
        path.unlink(missing_ok=True)


def hivemind_sockets(pids: Sequence[int]) -> list[Path]:
    """The unix sockets under HIVEMIND_SOCKET_PREFIX that these processes hold open (hivemind names its daemon's
    and its clients' sockets so, in /tmp)."""
    paths = _bound_hivemind_sockets()
    held = []
    for pid in pids:
        for link in _fd_links(pid):
            inode = link.removeprefix("socket:[").removesuffix("]")
            if link.startswith("socket:[") and inode in paths:
                held.append(paths[inode])
    return held


def hivemind_socket_files() -> set[Path]:
    """Every socket file under HIVEMIND_SOCKET_PREFIX, whether a socket is still bound to it or not."""
    prefix = Path(HIVEMIND_SOCKET_PREFIX)
    return set(prefix.parent.glob(f"{prefix.name}*.sock"))


def remove_stale_hivemind_sockets(paths: Iterable[Path], timeout: float) -> None:
    """Remove those of these socket files that no socket is bound to, waiting up to `timeout` seconds for the
    others to be let go by processes that are ending; a file still bound then is someone's, and stays."""
    pending = set(paths)
    deadline = time.monotonic() + timeout
    while pending:
        bound = set(_bound_hivemind_sockets().values())
        for path in pending - bound:
            path.unlink(missing_ok=True)
        pending &= bound
        if pending and time.monotonic() < deadline:
            time.sleep(STALE_SOCKET_POLL_SECONDS)
        else:
            return


def _bound_hivemind_sockets() -> dict[str, Path]:
    """Socket inode -> the path under HIVEMIND_SOCKET_PREFIX it is bound to, for every such socket (/proc/net/unix)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return {}
    paths = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith(HIVEMIND_SOCKET_PREFIX):
            paths[fields[6]] = Path(fields[7])
    return paths


def _fd_links(pid: int) -> list[str]:
    """What the process's open file descriptors point to; none if it is gone or not ours to read."""
    links = []
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return []
    for fd in fds:
        try:
            links.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
    return links
