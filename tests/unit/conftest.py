"""Fixtures shared by the unit tests of the peer's block runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.models import BlockSlice, ModelSource, load_block_slice
from tests.model_factory import save_tiny_model


@pytest.fixture(scope="module")
def block_slice(tmp_path_factory: pytest.TempPathFactory) -> BlockSlice:
    """Both blocks of a tiny random Llama, loaded as a peer loads its span."""
    path: Path = tmp_path_factory.mktemp("llama")
    save_tiny_model("llama", path, num_layers=2)
    return load_block_slice(ModelSource.open(path), 0, 2)
