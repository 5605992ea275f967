"""Fixtures that start real swarms (bootstrap node + peer processes on 127.0.0.1) and tear them down by PID."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from swarm import AutoDistributedModelForCausalLM, ClientConfig, DistributedModelForCausalLM
from swarm.testing import LocalSwarm
from tests.model_factory import save_tiny_model


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # peers run beside the tests on 2 cores


@pytest.fixture(scope="module")
def make_swarm() -> Iterator[Callable[..., LocalSwarm]]:
    """Start LocalSwarms that stop when the module's tests are done."""
    swarms: list[LocalSwarm] = []

    def make(model: Path, spans: list[tuple[int, int]], **kwargs: object) -> LocalSwarm:
        local_swarm = LocalSwarm(model, spans, **kwargs)
        swarms.append(local_swarm)
        return local_swarm.start()

    try:
        yield make
    finally:
        for local_swarm in swarms:
            local_swarm.close()


@pytest.fixture(scope="module")
def connect() -> Iterator[Callable[..., DistributedModelForCausalLM]]:
    """Clients that leave the swarm when the module's tests are done."""
    models: list[DistributedModelForCausalLM] = []

    def open_model(
        model: Path,
        local_swarm: LocalSwarm,
        adapter: Path | None = None,
        dtype: torch.dtype | None = None,
        device: str = "cpu",
        **config: object,
    ) -> DistributedModelForCausalLM:
        client_config = ClientConfig(initial_peers=tuple(local_swarm.initial_peers), **config)  # type: ignore[arg-type]
        distributed = AutoDistributedModelForCausalLM.from_pretrained(
            model, config=client_config, adapter=adapter, dtype=dtype, device=device
        )
        models.append(distributed)
        return distributed

    try:
        yield open_model
    finally:
        for distributed in models:
            distributed.close()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    def make(family: str, num_layers: int) -> Path:
        path = tmp_path_factory.mktemp("models") / f"tiny-{family}"
        save_tiny_model(family, path, num_layers=num_layers)
        return path

    return make
