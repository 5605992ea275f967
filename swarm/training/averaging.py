"""Gradient averaging between trainers that join one run, with `hivemind.Optimizer`.

Each trainer accumulates gradients of its trainable parameters (prompts, LoRA adapters; the blocks stay frozen
on the peers) until the run as a whole has processed `target_batch_size` samples. Then the trainers form a group
through the DHT, all-reduce their gradients and each takes the same optimizer step: one "epoch" of the run.
Trainers may join and leave at any time:
  * one that joins late (or fell behind) sees that its epoch lags the run's and downloads parameters and
    optimizer state from another trainer (`load_state_from_peers`);
  * one that dies costs the others at most one `averaging_timeout`: their round fails to form a group with it and
    they proceed with what they have.

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

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import hivemind
import torch

from swarm.compression import AVERAGING_CODECS, averaging_codec
from swarm.errors import ConfigError

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

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ConfigError("run_id is empty: trainers that share a run_id average with each other")
        if self.target_batch_size <= 0 or self.batch_size_per_step <= 0:
            raise ConfigError("target_batch_size and batch_size_per_step must be positive")
        if self.matchmaking_time <= 0 or self.averaging_timeout <= 0 or self.load_state_timeout <= 0:
            raise ConfigError("matchmaking_time, averaging_timeout and load_state_timeout must be positive")
        if self.compression not in AVERAGING_CODECS:
            raise ConfigError(f"compression {self.compression!r} is not one of {', '.join(AVERAGING_CODECS)}")


def collaborative_optimizer(
    dht: hivemind.DHT,
    params: Iterable[torch.nn.Parameter],
    config: CollaborationConfig,
    inner_optimizer: InnerOptimizer,
) -> hivemind.Optimizer:
    """A `hivemind.Optimizer` for `params` in the run `config.run_id`; `inner_optimizer(params)` makes the torch
    optimizer that takes each averaged step. Use it like a torch optimizer: `loss.backward(); opt.step();
    opt.zero_grad()`; `opt.local_epoch` counts the run's steps.

    Create it before anything starts threads in this process (the averagers fork), e.g. before the first
    forward through the swarm, and call `opt.shutdown()` before closing the DHT.
    """
    dht._client_mode = False  # averagers and tracker in full mode; the DHT node itself stays a client (see above)
    params = list(params)
    if not params:
        raise ConfigError("nothing to train: pick a tuning mode (ptune, deep-ptune, lora) or unfreeze a module")
    codec = averaging_codec(config.compression)
    return hivemind.Optimizer(
        dht=dht,
        run_id=config.run_id,
        params=params,
        optimizer=inner_optimizer,
        target_batch_size=config.target_batch_size,
        batch_size_per_step=config.batch_size_per_step,
        matchmaking_time=config.matchmaking_time,
        averaging_timeout=config.averaging_timeout,
        load_state_timeout=config.load_state_timeout,
        grad_compression=codec,
        state_averaging_compression=codec,
        # hivemind warns when request_timeout (default 3 s) exceeds the matchmaking time
        averager_opts=dict(request_timeout=min(3.0, config.matchmaking_time / 2)),
        verbose=logger.isEnabledFor(logging.INFO),
    )
