"""The DiLoCo local-steps mode (swarm.training.averaging): the outer gradient, the outer step's arithmetic, restarts
from the run's parameters, and one trainer on a real hivemind DHT (no swarm)."""

from __future__ import annotations

from collections.abc import Iterator

import hivemind
import pytest
import torch

from swarm.dht import start_dht
from swarm.process import hivemind_sockets
from swarm.testing import LOOPBACK
from swarm.training.averaging import (
    CollaborationConfig,
    LocalStepsOptimizer,
    collaborative_optimizer,
    load_outer_gradients_,
)

LOCAL_STEPS = 3
BATCH_SIZE = 2
ROUNDING_ATOL = 1e-6  # θ_start − (θ_start − θ_H) is θ_H up to float32 rounding
# hivemind's progress tracker never closes its thread's event loop; collected, the loop and its self-pipe warn


def _params() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=generator)), torch.nn.Parameter(torch.zeros(5))]


def _target(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(4, 3, generator=generator), torch.randn(5, generator=generator)]


def _local_step(params: list[torch.nn.Parameter], optimizer: object, step: int) -> None:
    """One step on a quadratic loss whose minimum moves with `step` (like a fresh batch each time)."""
    loss = sum(((param - target) ** 2).sum() for param, target in zip(params, _target(step), strict=True))
    loss.backward()
    optimizer.step()  # type: ignore[attr-defined]
    optimizer.zero_grad()  # type: ignore[attr-defined]


def _clone(tensors: list[torch.nn.Parameter] | list[torch.Tensor]) -> list[torch.Tensor]:
    return [tensor.detach().clone() for tensor in tensors]


def _assert_equal(actual: list[torch.nn.Parameter], expected: list[torch.Tensor]) -> None:
    for param, tensor in zip(actual, expected, strict=True):
        torch.testing.assert_close(param.detach(), tensor, rtol=0, atol=ROUNDING_ATOL)


def test_outer_step_with_lr_1_and_no_momentum_lands_on_the_local_result() -> None:
    params = _params()
    start = _clone(params)
    inner = torch.optim.AdamW(params, lr=0.1)
    for step in range(LOCAL_STEPS):
        _local_step(params, inner, step)
    local_result = _clone(params)

    load_outer_gradients_(params, start)
    for param, begin, end in zip(params, start, local_result, strict=True):
        assert torch.equal(param.detach(), begin)  # back at θ_start
        assert torch.equal(param.grad, begin - end)  # the outer gradient θ_start − θ_H
    torch.optim.SGD(params, lr=1.0, momentum=0.0).step()
    _assert_equal(params, local_result)


def test_outer_nesterov_steps_follow_the_formula() -> None:
    lr, momentum = 0.7, 0.9
    params = _params()
    inner = torch.optim.AdamW(params, lr=0.1)
    outer = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)
    expected, velocity = _clone(params), None
    for outer_step in range(2):
        start = _clone(params)
        for step in range(LOCAL_STEPS):
            _local_step(params, inner, LOCAL_STEPS * outer_step + step)
        deltas = [begin - param.detach() for begin, param in zip(start, params, strict=True)]
        # torch's Nesterov SGD: v = μ v + Δ (v = Δ at first), θ ← θ − lr (Δ + μ v)
        velocity = deltas if velocity is None else [momentum * v + d for v, d in zip(velocity, deltas, strict=True)]
        expected = [e - lr * (d + momentum * v) for e, d, v in zip(expected, deltas, velocity, strict=True)]
        load_outer_gradients_(params, start)
        outer.step()
        outer.zero_grad()
        _assert_equal(params, expected)


class _RecordingOuter:
    """Stands in for hivemind.Optimizer: records the outer gradients and either waits for more samples (no step)
    or, like a trainer that was behind the run, loads other parameters."""

    def __init__(self, params: list[torch.nn.Parameter], downloaded: list[torch.Tensor] | None = None):
        self.params, self.downloaded = params, downloaded
        self.local_epoch = 0
        self.outer_gradients: list[list[torch.Tensor]] = []

    def step(self) -> None:
        self.outer_gradients.append(_clone([param.grad for param in self.params]))  # type: ignore[misc]
        if self.downloaded is not None:
            with torch.no_grad():
                for param, tensor in zip(self.params, self.downloaded, strict=True):
                    param.copy_(tensor)
            self.local_epoch = 7


def test_parameters_restart_from_the_runs_when_the_run_has_not_stepped() -> None:
    params = _params()
    start = _clone(params)
    outer = _RecordingOuter(params)
    optimizer = LocalStepsOptimizer(outer, torch.optim.AdamW(params, lr=0.1), params, LOCAL_STEPS)  # type: ignore[arg-type]
    for step in range(LOCAL_STEPS - 1):
        _local_step(params, optimizer, step)
    assert not outer.outer_gradients and not torch.equal(params[0].detach(), start[0])  # local steps only
    for step in range(LOCAL_STEPS - 1, 2 * LOCAL_STEPS):
        _local_step(params, optimizer, step)
    assert len(outer.outer_gradients) == 2
    _assert_equal(params, start)  # no outer step yet: both rounds of local steps began at θ_start
    assert all(bool(gradient.abs().max() > 0) for gradients in outer.outer_gradients for gradient in gradients)


def test_downloaded_parameters_become_the_next_start() -> None:
    params = _params()
    downloaded = [torch.full_like(param, 3.0) for param in params]
    outer = _RecordingOuter(params, downloaded)
    optimizer = LocalStepsOptimizer(outer, torch.optim.AdamW(params, lr=0.1), params, 1)  # type: ignore[arg-type]
    _local_step(params, optimizer, 0)  # behind the run: the outer step downloads its parameters
    _assert_equal(params, downloaded)
    assert optimizer.local_epoch == 7
    outer.downloaded = None
    _local_step(params, optimizer, 1)  # no outer step: back to the downloaded parameters, not the initial ones
    _assert_equal(params, downloaded)


@pytest.fixture
def dht() -> Iterator[hivemind.DHT]:
    dht = start_dht([], host_maddrs=[LOOPBACK])  # as a trainer's: its shutdown leaves no socket file (SwarmDHT)
    try:
        yield dht
    finally:
        dht.shutdown()


@pytest.mark.slow  # a DHT and two averager processes: about 4 s
def test_one_trainer_on_hivemind_with_outer_lr_1_trains_like_local_adamw(dht: hivemind.DHT) -> None:
    """With outer lr 1 and no momentum each outer step lands on the local result, so one trainer whose every
    outer gradient completes an epoch (target = H × batch) follows plain AdamW, one epoch per H steps."""
    config = CollaborationConfig(
        run_id="local-steps-unit",
        target_batch_size=LOCAL_STEPS * BATCH_SIZE,
        batch_size_per_step=BATCH_SIZE,
        local_steps=LOCAL_STEPS,
        outer_lr=1.0,
        outer_momentum=0.0,
        matchmaking_time=1.0,
    )
    params, reference = _params(), _params()
    reference_optimizer = torch.optim.AdamW(reference, lr=0.1)
    optimizer = collaborative_optimizer(dht, params, config, lambda p: torch.optim.AdamW(p, lr=0.1))
    try:
        assert isinstance(optimizer, LocalStepsOptimizer)
        for step in range(2 * LOCAL_STEPS):
            _local_step(params, optimizer, step)
            _local_step(reference, reference_optimizer, step)
            assert optimizer.local_epoch == (step + 1) // LOCAL_STEPS
            _assert_equal(params, _clone(reference))
    finally:
        optimizer.shutdown()
        optimizer.tracker.join(timeout=10)


@pytest.mark.slow  # a DHT and two averager processes: about 4 s
def test_shutdown_removes_the_socket_files_of_its_averagers(dht: hivemind.DHT) -> None:
    """hivemind's averager processes end without closing their p2p client, whose socket file in /tmp would stay."""
    config = CollaborationConfig(run_id="sockets-unit", target_batch_size=BATCH_SIZE, batch_size_per_step=BATCH_SIZE)
    optimizer = collaborative_optimizer(dht, _params(), config, lambda p: torch.optim.AdamW(p, lr=0.1))
    try:
        assert isinstance(optimizer, hivemind.Optimizer)
        sockets = hivemind_sockets([optimizer.state_averager.pid, optimizer.grad_averager.pid])
        assert len(sockets) == 2 and all(path.exists() for path in sockets), sockets  # started, serving streams
    finally:
        optimizer.shutdown()
        optimizer.tracker.join(timeout=10)
    assert [path for path in sockets if path.exists()] == []
