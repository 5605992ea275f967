"""Averaging between trainers that join one run, with `hivemind.Optimizer`: of gradients every step, or (DiLoCo)
of the parameter change after several local steps.

Each trainer accumulates gradients of its trainable parameters (prompts, LoRA adapters; the blocks stay frozen
on the peers) until the run as a whole has processed `target_batch_size` samples. Then the trainers form a group
through the DHT, all-reduce their gradients and each takes the same optimizer step: one "epoch" of the run.
Trainers may join and leave at any time:
  * one that joins late (or fell behind) sees that its epoch lags the run's and downloads parameters and
    optimizer state from another trainer (`load_state_from_peers`);
  * one that dies costs the others at most one `averaging_timeout`: their round fails to form a group with it and
    they proceed with what they have.

With `local_steps` H > 1 (DiLoCo, arXiv:2311.08105), `LocalStepsOptimizer` puts a local inner optimizer (AdamW)
in front: each trainer takes H inner steps on its own batches without talking to anyone, then hands the
"outer gradient" θ_start − θ_now to the `hivemind.Optimizer`, whose wrapped optimizer is Nesterov SGD
(`outer_lr`, `outer_momentum`). An epoch is then one averaged outer step, and a trainer communicates once per
H local steps. hivemind counts H × batch_size_per_step samples per outer gradient and averages what it
accumulated (mean of this trainer's outer gradients, then weighted by samples across trainers), so a
`target_batch_size` of about trainers × H × batch_size gives one outer step per trainer per epoch. Until the run
reaches its target the outer gradient waits in hivemind's accumulator and the parameters restart from θ_start,
the last parameters the run agreed on, so every accumulated outer gradient starts from the same point. The run's
parameter averaging runs inside the outer step (hivemind's default is in the background): an average applied in
the middle of the local steps would move the parameters under them and split the trainers (measured).

The trainers' DHT nodes stay in client mode (as every client's), but their averagers must not: client-mode averagers
only join groups that hold a full one, so a run of clients alone would never average. hivemind 1.1.12 gives the
averagers the DHT's mode, and its Optimizer even overrides an explicit `client_mode`
(`client_mode if client_mode is None else dht.client_mode`), so `collaborative_optimizer` sets the DHT handle's
cached mode to full for this process's averagers and tracker. That is enough: the DHT's p2pd listens on
`host_maddrs` either way, and the averagers serve their streams on it.
Making the DHT node itself a full one instead breaks late joiners: each trainer then keeps its own progress record
in its local storage, and a lookup of the run's progress apparently returns that dictionary (the latest-expiring) rather
than the one that holds the other trainers' records; a trainer started after the others saw only itself (measured).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import hivemind
import torch
from hivemind.optim.progress_tracker import ProgressTracker

from swarm.compression import AVERAGING_CODECS, averaging_codec
from swarm.errors import ConfigError
from swarm.process import removing_hivemind_sockets

logger = logging.getLogger(__name__)

InnerOptimizer = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True, slots=True)
class CollaborationConfig:
    run_id: str  # trainers with the same run_id average with each other (a DHT key prefix)
    target_batch_size: int  # samples the whole run processes per epoch, i.e. per averaged optimizer step
    batch_size_per_step: int  # samples this trainer adds with each local step
    matchmaking_time: float = 3.0  # seconds to gather a group; on 2 shared cores below 2-3 s groups split
    averaging_timeout: float = 30.0  # seconds a round may take before a trainer proceeds with its own gradients
    compression: str = "none"  # averaging traffic: "none", "fp16" or "8bit" (swarm.compression.averaging_codec)
    load_state_timeout: float = 60.0  # seconds a late joiner waits for another trainer's state
    local_steps: int = 1  # inner steps between outer steps (DiLoCo's H); 1: average gradients at every step
    outer_lr: float = 0.7  # local_steps > 1: learning rate of the outer Nesterov SGD (DiLoCo's 0.7)
    outer_momentum: float = 0.9  # local_steps > 1: its momentum (DiLoCo's 0.9; 0 makes it plain SGD)

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ConfigError("run_id is empty: trainers that share a run_id average with each other")
        if self.target_batch_size <= 0 or self.batch_size_per_step <= 0:
            raise ConfigError("target_batch_size and batch_size_per_step must be positive")
        if self.matchmaking_time <= 0 or self.averaging_timeout <= 0 or self.load_state_timeout <= 0:
            raise ConfigError("matchmaking_time, averaging_timeout and load_state_timeout must be positive")
        if self.compression not in AVERAGING_CODECS:
            raise ConfigError(f"compression {self.compression!r} is not one of {', '.join(AVERAGING_CODECS)}")
        if self.local_steps < 1:
            raise ConfigError(
                f"local_steps must be at least 1 (1: average gradients every step), got {self.local_steps}"
            )
        if self.outer_lr <= 0:
            raise ConfigError(f"outer_lr must be positive (DiLoCo uses 0.7), got {self.outer_lr}")
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"outer_momentum must be in [0, 1) (DiLoCo uses 0.9), got {self.outer_momentum}")


def load_outer_gradients_(params: Sequence[torch.nn.Parameter], start: Sequence[torch.Tensor]) -> None:
    """DiLoCo's outer gradient: set each parameter's `.grad` to `start - param` (the local steps' change, negated,
    so that an SGD step with lr 1 and no momentum lands on the local result) and move the parameter back to start."""
    with torch.no_grad():
        for param, begin in zip(params, start, strict=True):
            param.grad = begin - param
            param.copy_(begin)


class LocalStepsOptimizer:
    """`local_steps` inner steps on this trainer alone, then one outer step averaged with the run (DiLoCo).

    Used like `hivemind.Optimizer`: `loss.backward(); opt.step(); opt.zero_grad()` once per local batch;
    `local_epoch` counts the run's outer steps. The inner optimizer's state (AdamW's moments) stays local.
    """

    def __init__(
        self,
        outer: hivemind.Optimizer,
        inner: torch.optim.Optimizer,
        params: Sequence[torch.nn.Parameter],
        local_steps: int,
    ):
        self.outer, self.inner, self.local_steps = outer, inner, local_steps
        self._params = list(params)
        self._start = self._snapshot()  # θ_start: the parameters the run last agreed on
        self._steps_since_outer = 0

    @property
    def local_epoch(self) -> int:
        return self.outer.local_epoch

    @property
    def tracker(self) -> ProgressTracker:
        return self.outer.tracker

    def step(self) -> None:
        """After `loss.backward()`: an inner step; every `local_steps`-th one then hands the run an outer gradient."""
        self.inner.step()
        self._steps_since_outer += 1
        if self._steps_since_outer < self.local_steps:
            return
        self._steps_since_outer = 0
        epoch = self.outer.local_epoch
        load_outer_gradients_(self._params, self._start)
        # accumulates the outer gradient; once the run has its target batch: averages and steps. A trainer behind
        # the run downloads its state here instead. Either way the parameters now are the run's: the next start.
        self.outer.step()
        self._start = self._snapshot()
        if self.outer.local_epoch == epoch:
            logger.debug("epoch %d not reached: restarting local steps from the run's parameters", epoch + 1)

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def shutdown(self) -> None:
        self.outer.shutdown()

    def _snapshot(self) -> list[torch.Tensor]:
        return [param.detach().clone() for param in self._params]


CollaborativeOptimizer = hivemind.Optimizer | LocalStepsOptimizer


def collaborative_optimizer(
    dht: hivemind.DHT,
    params: Iterable[torch.nn.Parameter],
    config: CollaborationConfig,
    inner_optimizer: InnerOptimizer,
) -> CollaborativeOptimizer:
    """An optimizer for `params` in the run `config.run_id`. With `config.local_steps` 1, a `hivemind.Optimizer`
    whose averaged steps `inner_optimizer(params)` takes; above 1, a `LocalStepsOptimizer` whose local steps it
    takes, between averaged Nesterov SGD steps. Use either like a torch optimizer: `loss.backward(); opt.step();
    opt.zero_grad()`; `opt.local_epoch` counts the run's steps.

    Create it before anything starts threads in this process (the averagers fork), e.g. before the first
    forward through the swarm, and call `opt.shutdown()` before closing the DHT.
    """
    dht._client_mode = False  # averagers and tracker in full mode; the DHT node itself stays a client (see above)
    params = list(params)
    if not params:
        raise ConfigError("nothing to train: pick a tuning mode (ptune, deep-ptune, lora) or unfreeze a module")
    if config.local_steps == 1:
        return _hivemind_optimizer(dht, params, config, inner_optimizer, config.batch_size_per_step)
    lr, momentum = config.outer_lr, config.outer_momentum
    outer = _hivemind_optimizer(
        dht,
        params,
        config,
        lambda outer_params: torch.optim.SGD(outer_params, lr=lr, momentum=momentum, nesterov=momentum > 0),
        config.local_steps * config.batch_size_per_step,  # samples behind each outer gradient
        # the run's parameters land in step(), never in the middle of the local steps that start from them
        delay_state_averaging=False,
    )
    return LocalStepsOptimizer(outer, inner_optimizer(params), params, config.local_steps)


class _AveragingOptimizer(hivemind.Optimizer):
    """hivemind's Optimizer, whose `shutdown` also removes the unix sockets its averager processes listened on:
    they end without closing their replica of the DHT's p2p client, which would leave its socket file
    (/tmp/hivemind-p2pclient-*.sock) behind, two for every trainer run."""

    def shutdown(self) -> None:
        averagers = [self.state_averager, getattr(self, "grad_averager", None)]
        pids = [averager.pid for averager in averagers if averager is not None and averager.pid]
        with removing_hivemind_sockets(pids):
            super().shutdown()


def _hivemind_optimizer(
    dht: hivemind.DHT,
    params: list[torch.nn.Parameter],
    config: CollaborationConfig,
    optimizer: InnerOptimizer,
    batch_size_per_step: int,
    delay_state_averaging: bool = True,
) -> hivemind.Optimizer:
    codec = averaging_codec(config.compression)
    with _ctrl_c_kept():
        return _AveragingOptimizer(
            dht=dht,
            run_id=config.run_id,
            params=params,
            optimizer=optimizer,
            target_batch_size=config.target_batch_size,
            batch_size_per_step=batch_size_per_step,
            matchmaking_time=config.matchmaking_time,
            averaging_timeout=config.averaging_timeout,
            load_state_timeout=config.load_state_timeout,
            grad_compression=codec,
            state_averaging_compression=codec,
            delay_state_averaging=delay_state_averaging,
            # hivemind warns when request_timeout (default 3 s) exceeds the matchmaking time
            averager_opts=dict(request_timeout=min(3.0, config.matchmaking_time / 2)),
            verbose=logger.isEnabledFor(logging.INFO),
        )


@contextlib.contextmanager
def _ctrl_c_kept() -> Iterator[None]:
    """Give Ctrl-C back to the trainer once hivemind's averagers have started: each ignores SIGINT in the process
    that starts it, so that its forked process ignores it too, and never restores it: the trainer then ignored
    Ctrl-C for good."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers belong to the main thread (hivemind's averagers cannot start elsewhere either)
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
