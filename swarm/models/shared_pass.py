"""Rows that several threads hand to the same row-wise function at once go through it in one call.

A client process that decodes several sequences side by side (the gateway's concurrent requests, `swarm bench`'s
concurrent sessions) runs its LM head once per sequence and token. For one row the head is a matrix-vector
product, bound by reading the whole [vocab, hidden] weight: on a CPU, 8 rows in one call cost twice one row, a
quarter of 8 calls (12.1 against 6.0 ms, a 32000 x 512 head on one thread), and on a GPU one call is one launch
instead of 8.

A call made while none runs starts the next pass; calls made while one runs queue, and the pass after takes all
of them. A lone caller never waits for company. Once passes have had company (within COMPANY_S), a pass waits
for more callers while they keep arriving, at most GATHER_GAP_S apart and GATHER_MAX_S in all: sessions whose
steps a peer ran as one batch get their outputs back together, and their heads then share a pass instead of
the first running alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

COMPANY_S = 0.1  # passes wait for more callers only while some pass had company this recently
GATHER_GAP_S = 0.0005  # a pass starts once no caller has come for this long...
GATHER_MAX_S = 0.002  # ...or this long after it could have started
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

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queued: list[_Call] = []
        self._running = False
        self._company_at = -COMPANY_S  # monotonic time a pass last had more than one caller
        self.passes = 0  # passes run, for tests and profiling
        self.calls = 0

    def run(self, function: RowFunction, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.reshape(-1, inputs.shape[-1])
        if rows.shape[0] > MAX_SHARED_ROWS or torch.is_grad_enabled():  # autograd stays in the caller's thread
            return function(inputs)
        call = _Call(rows)
        with self._lock:
            self.calls += 1
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
            if len(batch) > 1:
                self._company_at = time.monotonic()
        groups = _compatible_groups(batch)
        for group in groups:
            _run_group(function, group)
        with self._lock:
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
        """With the lock held: while passes have company, wait for callers that keep arriving (module doc)."""
        now = time.monotonic()
        if now - self._company_at > COMPANY_S:
            return
        deadline = now + GATHER_MAX_S
        while (left := deadline - time.monotonic()) > 0:
            queued = len(self._queued)
            self._arrived.wait(min(GATHER_GAP_S, left))
            if len(self._queued) == queued:
                return

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
