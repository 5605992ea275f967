"""Threads that ask for an LM head's logits at the same time share one pass (`SharedPass`): each gets exactly
the rows it would get alone, a pass waits for half of the active callers, a failing pass fails every caller in it,
and callers with autograd run alone."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from swarm.models.client_modules import ClientModules
from swarm.models.shared_pass import SharedPass
from swarm.models.weight_layout import is_column_major, store_wide_linears_column_major
from tests.prometheus_tools import wait_for

WAIT_S = 60.0  # longest any test waits for a thread: reached only when the code under test is broken
POLL_S = 0.01
HIDDEN = 16
VOCAB = 50


class _GatedFunction:
    """A row-wise function whose first call blocks until released, so that other callers queue behind it."""

    def __init__(self, shared: SharedPass, queued_before_release: int):
        self.shared = shared
        self.queued_before_release = queued_before_release
        self.rows_per_call: list[int] = []
        self.weight = torch.randn(HIDDEN, VOCAB, generator=torch.Generator().manual_seed(0))

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.rows_per_call.append(rows.shape[0])
        if len(self.rows_per_call) == 1:
            wait_for(lambda: self.shared.calls >= self.queued_before_release, WAIT_S, "callers to queue", POLL_S)
        return rows @ self.weight


def _without_grad(call, *args):  # type: ignore[no-untyped-def]
    with torch.no_grad():  # grad mode is per thread
        return call(*args)


def _inputs(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn(1, rows, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_callers_that_queue_behind_a_pass_share_the_next_and_each_gets_its_own_rows() -> None:
    shared = SharedPass()
    function = _GatedFunction(shared, queued_before_release=4)
    inputs = [_inputs(0), _inputs(1, rows=2), _inputs(2), _inputs(3, rows=3)]
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(_without_grad, shared.run, function, inputs[0])
        wait_for(lambda: function.rows_per_call, WAIT_S, "the first pass", POLL_S)  # the others queue behind it
        others = [pool.submit(_without_grad, shared.run, function, x) for x in inputs[1:]]
        results = [first.result(WAIT_S)] + [future.result(WAIT_S) for future in others]

    assert function.rows_per_call == [1, 6]  # the three queued callers' rows went through in one pass
    assert (shared.calls, shared.passes) == (4, 2)
    for x, result in zip(inputs, results, strict=True):
        assert result.shape == (1, x.shape[1], VOCAB)
        torch.testing.assert_close(result, x @ function.weight, rtol=1e-5, atol=1e-5)  # float32


class _Caller:
    """A session, as `SharedPass` knows one: any object it can reference weakly."""


def _active_callers(shared: SharedPass, count: int) -> list[_Caller]:
    """`count` callers that each called once, on their own (each pass waits for company no longer than the one
    before it took, microseconds); then passes are made to wait for company as long as a test needs."""
    callers = [_Caller() for _ in range(count)]
    for caller in callers:
        _without_grad(shared.run, lambda rows: rows, _inputs(0), caller)
    shared.last_pass_s = shared.max_wait_s
    return callers


def test_a_pass_waits_until_half_of_the_active_callers_have_come() -> None:
    shared = SharedPass(max_wait_s=WAIT_S)
    callers = _active_callers(shared, 4)
    function = _GatedFunction(shared, queued_before_release=0)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_without_grad, shared.run, function, _inputs(1), callers[0])
        wait_for(lambda: shared.calls == 5, WAIT_S, "the first caller", POLL_S)
        assert not function.rows_per_call  # 1 of 4 active callers: its pass waits for a second
        second = pool.submit(_without_grad, shared.run, function, _inputs(2), callers[1])
        results = [first.result(WAIT_S), second.result(WAIT_S)]
    assert function.rows_per_call == [2]
    for seed, result in zip((1, 2), results, strict=True):
        torch.testing.assert_close(result, _inputs(seed) @ function.weight)


def test_callers_that_are_gone_are_not_waited_for() -> None:
    shared = SharedPass(max_wait_s=2 * WAIT_S)  # a pass that waited for them would outlast the test's wait
    callers = _active_callers(shared, 4)
    del callers[2:]  # two sessions ended: 2 active callers, and one of them alone is half
    gc.collect()
    function = _GatedFunction(shared, queued_before_release=0)
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(_without_grad, shared.run, function, _inputs(1), callers[0]).result(WAIT_S)
    assert function.rows_per_call == [1]
    torch.testing.assert_close(result, _inputs(1) @ function.weight)


def test_a_failing_pass_fails_each_of_its_callers_and_the_next_pass_runs() -> None:
    shared = SharedPass()
    gated = _GatedFunction(shared, queued_before_release=3)

    def failing_after_the_first(rows: torch.Tensor) -> torch.Tensor:
        result = gated(rows)
        if len(gated.rows_per_call) == 2:
            raise ValueError("broken head")
        return result

    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(_without_grad, shared.run, failing_after_the_first, _inputs(0))
        wait_for(lambda: gated.rows_per_call, WAIT_S, "the first pass", POLL_S)
        failing = [pool.submit(_without_grad, shared.run, failing_after_the_first, _inputs(seed)) for seed in (1, 2)]
        first.result(WAIT_S)
        for future in failing:
            with pytest.raises(ValueError, match="broken head"):
                future.result(WAIT_S)
        later = _without_grad(shared.run, failing_after_the_first, _inputs(3))
    torch.testing.assert_close(later, _inputs(3) @ gated.weight)
    assert gated.rows_per_call == [1, 2, 1]


def test_a_caller_with_autograd_runs_alone_and_gets_gradients() -> None:
    shared = SharedPass()
    weight = torch.randn(HIDDEN, VOCAB, requires_grad=True)
    result = shared.run(lambda rows: rows @ weight, _inputs(0))
    result.sum().backward()
    assert weight.grad is not None
    assert (shared.calls, shared.passes) == (0, 0)


def test_client_logits_of_concurrent_threads_equal_the_heads_own() -> None:
    """Through `ClientModules.logits`, with the head stored column-major as a CPU client loads it; the expected
    logits come from the row-major weight, as the checkpoint stores it."""
    torch.manual_seed(0)
    vocab = 8192
    modules = ClientModules(
        layout=None,  # type: ignore[arg-type]  # logits need no layout
        embeddings=nn.Embedding(vocab, HIDDEN),
        final_norm=nn.LayerNorm(HIDDEN),
        lm_head=nn.Linear(HIDDEN, vocab, bias=False),
    ).eval()
    row_major = modules.lm_head.weight.detach().clone()
    assert store_wide_linears_column_major(modules) == 1
    assert is_column_major(modules.lm_head.weight)
    inputs = [_inputs(seed, rows=1 + seed % 3) for seed in range(12)]
    few_rows = torch.cat([x.reshape(-1, HIDDEN) for x in inputs[:4]])  # 1 + 2 + 3 + 1 rows
    with torch.no_grad():
        expected = [nn.functional.linear(modules.final_norm(x), row_major) for x in inputs]
        together = modules._head(few_rows)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda x: _without_grad(modules.logits, x), inputs))
    torch.testing.assert_close(together, torch.cat([e.reshape(-1, vocab) for e in expected[:4]]))  # float32
    for result, own in zip(results, expected, strict=True):
        torch.testing.assert_close(result, own)
