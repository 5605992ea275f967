"""Rows that several threads hand to the same row-wise function at once go through it in one call.

A client process that decodes several sequences side by side (the gateway's concurrent requests, `swarm bench`'s
concurrent sessions) runs its LM head once per sequence and token. For one row the head is a matrix-vector
product, bound by reading the whole [vocab, hidden] weight: on a CPU, 8 rows in one call cost twice one row, a
quarter of 8 calls (12.1 against 6.0 ms, a 32000 x 512 head on one thread), and on a GPU one call is one launch
instead of 8.

A call made while none runs starts the next pass; calls made while one runs queue, and the pass after takes all
of them. A caller names itself (`caller`: its session), and a pass waits for company as a peer's decode batch
does (peer/runtime.py): while fewer than half of the callers that called within ACTIVE_CALLER_S are queued, for
at most as long as the last pass took (a longer wait would cost more than passing apart) and `max_wait_s`. One or
two callers never wait. Without it, 8 sessions through 2 loopback peers of the 58M benchmark model on 2 CPU
cores settled into passes of 2.3 to 2.9 callers, one group of sessions at the head, one at each peer, all three
contending for the cores; with it (and the peers' `--decode-gather-ms` 30), in two groups of about 4, the head's
passes had 3.5 to 3.6 callers and the peers' 3.7 to 3.8, and the 8 sessions decoded 3.44x to 3.57x as fast as one
(against 2.7x to 2.9x).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ACTIVE_CALLER_S = 1.0  # a caller that called this recently is expected to call again soon
GATHER_MAX_S = 0.02  # the longest a pass waits for company, however long the last one took
MAX_SHARED_ROWS = 64  # a caller with more rows (a prompt's logits) gains nothing from company; it runs alone

RowFunction = Callable[[torch.Tensor], torch.Tensor]


@dataclass(slots=True, eq=False)
class _Call:
    rows: torch.Tensor  # [rows, features]
    done: threading.Event = field(default_factory=threading.Event)
    leads: bool = False  # set when this caller is to run the next pass (for itself and whoever queued)
    result: torch.Tensor | None = None
    error: BaseException | None = None


class SharedPass:
    """`run(function, inputs)` applies a row-wise `function` to [..., features] `inputs`; concurrent calls share
    passes. `function` must treat each row alone (a norm then a linear layer), so that rows from other callers
    cannot change a row's result, and it must be the same for every caller of one `SharedPass`."""

    def __init__(self, max_wait_s: float = GATHER_MAX_S) -> None:
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queued: list[_Call] = []
        self._running = False
        # each named caller -> when it last called; gone with the caller
        self._callers: weakref.WeakKeyDictionary[object, float] = weakref.WeakKeyDictionary()
        self.last_pass_s = 0.0  # seconds of the last pass: a pass never waits longer for company
        self.passes = 0  # passes run, for tests and profiling
        self.calls = 0

    def run(self, function: RowFunction, inputs: torch.Tensor, caller: object | None = None) -> torch.Tensor:
        """`function(inputs)`, in a pass shared with concurrent callers; `caller` (weakly referenced: a session)
        names the caller, whose next calls later passes then expect."""
        rows = inputs.reshape(-1, inputs.shape[-1])
        if rows.shape[0] > MAX_SHARED_ROWS or torch.is_grad_enabled():  # autograd stays in the caller's thread
            return function(inputs)
        call = _Call(rows)
        with self._lock:
            self.calls += 1
            if caller is not None:
                self._callers[caller] = time.monotonic()
            self._queued.append(call)
            call.leads = not self._running
            self._running = True
            self._arrived.notify()
        while not call.leads:
            call.done.wait()
            call.done.clear()
            if call.result is not None or call.error is not None:
                break
        if call.leads:
            self._lead(function)
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result.reshape(*inputs.shape[:-1], call.result.shape[-1])

    def _lead(self, function: RowFunction) -> None:
        """Run one pass over every queued call (this caller's own among them), then hand the lead to a call that
        queued meanwhile, or stop."""
        with self._lock:
            self._gather()
            batch, self._queued = self._queued, []
        began = time.monotonic()
        groups = _compatible_groups(batch)
        for group in groups:
            _run_group(function, group)
        with self._lock:
            self.last_pass_s = time.monotonic() - began
            self.passes += len(groups)
            if self._queued:
                successor = self._queued[0]
                successor.leads = True
                successor.done.set()
            else:
                self._running = False
        for call in batch:
            call.done.set()

    def _gather(self) -> None:
        """With the lock held: wait while fewer than half of the recently active callers are queued (module doc)."""
        now = time.monotonic()
        active = sum(now - at < ACTIVE_CALLER_S for at in list(self._callers.values()))
        deadline = now + min(self.max_wait_s, self.last_pass_s)
        while 2 * len(self._queued) < active and (left := deadline - time.monotonic()) > 0:
            self._arrived.wait(left)

    def __reduce__(self) -> tuple[type[SharedPass], tuple[()]]:
        return SharedPass, ()  # a copied or pickled model shares no state with the original


def _compatible_groups(batch: list[_Call]) -> list[list[_Call]]:
    """Calls whose rows can be concatenated: same dtype, device and width."""
    groups: dict[tuple[torch.dtype, torch.device, int], list[_Call]] = {}
    for call in batch:
        groups.setdefault((call.rows.dtype, call.rows.device, call.rows.shape[-1]), []).append(call)
    return list(groups.values())


def _run_group(function: RowFunction, group: list[_Call]) -> None:
    try:
        with torch.no_grad():
            if len(group) == 1:
                outputs = [function(group[0].rows)]
            else:
                outputs = function(torch.cat([call.rows for call in group])).split([len(c.rows) for c in group])
        for call, output in zip(group, outputs, strict=True):
            call.result = output
    except BaseException as error:  # every caller of the pass sees its failure
        for call in group:
            call.error = error
