"""A peer reads only the tensors of the blocks it hosts, from a local directory or the Hugging Face cache."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import PreTrainedModel

from swarm.errors import ModelNotFoundError
from swarm.models import ModelSource, load_block_slice, load_client_modules
from tests.model_factory import FAMILIES, FIRST_ORDINARY_TOKEN, VOCAB_SIZE, save_tiny_model

NUM_LAYERS = 6
HOSTED = (1, 2)
# how every supported family names block 1's tensors (`model.layers.1.`, `transformer.h.1.`, ...), independently of
# the layout probe, so a probe bug cannot hide a loader bug
HOSTED_BLOCK_NAME = re.compile(rf"(^|\.)(layers|h)\.{HOSTED[0]}\.")


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def record_reads(source: ModelSource) -> list[str]:
    """Names passed to `source.checkpoint.read`, in order, for the rest of the test."""
    requested: list[str] = []
    read = source.checkpoint.read

    def recording_read(names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        requested.extend(names)
        return read(names)

    source.checkpoint.read = recording_read
    return requested


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_slice_reads_only_its_blocks_tensors_and_shards(tmp_path: Path, family: str) -> None:
    model = save_tiny_model(family, tmp_path, num_layers=NUM_LAYERS, sharded=True)
    stored = weight_map(tmp_path)
    source = ModelSource.open(tmp_path)
    block_names = {name for name in stored if HOSTED_BLOCK_NAME.search(name)}
    assert block_names == set(source.layout.tensors_under(source.layout.block_prefix(HOSTED[0])))
    block_files = {stored[name] for name in block_names}
    assert block_files < set(stored.values()), "shards too large for this test: block 1 shares them with everything"
    requested = record_reads(source)

    load_block_slice(source, *HOSTED)

    assert set(requested) == block_names
    statistics = source.checkpoint.statistics()
    assert statistics.tensors_read == len(block_names)
    assert set(statistics.files_opened) == block_files
    assert len(statistics.files_opened) == len(block_files)  # each shard opened once
    state = model.state_dict()
    total_bytes = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    assert statistics.bytes_read < total_bytes / 4  # one block of six, no embeddings or head


@pytest.mark.parametrize("family", list(FAMILIES))
def test_client_modules_read_no_block_tensor(tmp_path: Path, family: str) -> None:
    save_tiny_model(family, tmp_path, num_layers=NUM_LAYERS, sharded=True)
    stored = weight_map(tmp_path)
    source = ModelSource.open(tmp_path)
    layout = source.layout
    block_names = {name for index in range(NUM_LAYERS) for name in layout.tensors_under(layout.block_prefix(index))}
    requested = record_reads(source)

    load_client_modules(source)

    assert requested
    assert set(requested) == stored.keys() - block_names
    assert set(source.checkpoint.statistics().files_opened) == {stored[name] for name in requested}


def test_opening_a_model_reads_no_tensor(tmp_path: Path) -> None:
    save_tiny_model("llama", tmp_path, sharded=True)
    statistics = ModelSource.open(tmp_path).checkpoint.statistics()
    assert (statistics.tensors_read, statistics.bytes_read, statistics.files_opened) == (0, 0, ())


# The Hugging Face cache, offline. huggingface_hub reads its environment once at import, so the tests patch its
# constants as well as the environment (the latter for any library that reads it later).
REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache directory that the hub client uses, offline."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache: Path, repo_id: str, model_dir: Path, files: list[str]) -> Path:
    """Lay out `files` of `model_dir` as the hub client caches them: a snapshot per commit, `refs/main` naming it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in files:
        shutil.copy(model_dir / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def logits_through_slices(source: ModelSource, input_ids: torch.Tensor) -> torch.Tensor:
    client = load_client_modules(source)
    hidden = client.embed(input_ids)
    with torch.inference_mode():
        for start, end in ((0, 2), (2, 4)):
            hidden = load_block_slice(source, start, end)(hidden)
        return client.logits(hidden)


def expected_logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids).logits


def test_hugging_face_id_resolves_through_the_offline_cache(tmp_path: Path, offline_hub_cache: Path) -> None:
    model_dir = tmp_path / "saved"
    model = save_tiny_model("llama", model_dir)
    snapshot = put_in_cache(offline_hub_cache, REPO_ID, model_dir, ["config.json", "model.safetensors"])

    source = ModelSource.open(REPO_ID)

    assert source.checkpoint.config_dir == snapshot
    input_ids = torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (2, 5))
    torch.testing.assert_close(logits_through_slices(source, input_ids), expected_logits(model, input_ids))


def test_cached_sharded_model_needs_only_the_hosted_shards(tmp_path: Path, offline_hub_cache: Path) -> None:
    model_dir = tmp_path / "saved"
    save_tiny_model("llama", model_dir, num_layers=NUM_LAYERS, sharded=True)
    stored = weight_map(model_dir)
    hosted_files = {file for name, file in stored.items() if name.startswith(f"model.layers.{HOSTED[0]}.")}
    assert hosted_files < set(stored.values())
    put_in_cache(offline_hub_cache, REPO_ID, model_dir, ["config.json", "model.safetensors.index.json", *hosted_files])

    source = ModelSource.open(REPO_ID)
    block_slice = load_block_slice(source, *HOSTED)

    local_slice = load_block_slice(ModelSource.open(model_dir), *HOSTED)
    hidden = torch.randn(1, 3, block_slice.hidden_size)
    with torch.inference_mode():
        assert torch.equal(block_slice(hidden), local_slice(hidden))
    with pytest.raises(ModelNotFoundError, match="Hugging Face cache"):
        load_block_slice(source, 0, 1)  # its shards are not cached, and offline mode forbids downloading them


def test_unknown_hugging_face_id_offline_is_not_found(offline_hub_cache: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="tiny-org/absent"):
        ModelSource.open("tiny-org/absent")
