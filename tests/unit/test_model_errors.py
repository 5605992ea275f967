"""Models that cannot be sliced, and ranges that do not fit, fail early with errors that say what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

from swarm.errors import BlockRangeError, ModelNotFoundError, UnsupportedModelError
from swarm.models import ModelSource, load_block_slice
from swarm.models.checkpoint import WEIGHT_FILES
from tests.model_factory import save_tiny_model, tiny_config

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    path = tmp_path_factory.mktemp("llama")
    save_tiny_model("llama", path, num_layers=NUM_LAYERS)
    return ModelSource.open(path)


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, NUM_LAYERS + 1), (NUM_LAYERS, NUM_LAYERS + 2), (2, 2), (3, 1), (-1, 2)],
    ids=["end-past-last", "start-past-last", "empty", "reversed", "negative"],
)
def test_block_range_outside_the_model_names_its_block_count(llama_source: ModelSource, start: int, end: int) -> None:
    with pytest.raises(BlockRangeError, match=rf"block range {start}:{end} is outside the model: it has 4 blocks"):
        load_block_slice(llama_source, start, end)


def test_whole_model_is_a_valid_range(llama_source: ModelSource) -> None:
    assert load_block_slice(llama_source, 0, NUM_LAYERS).end == NUM_LAYERS


def test_missing_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        ModelSource.open(tmp_path / "absent")


def test_relative_missing_directory_is_not_mistaken_for_a_hub_id() -> None:
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        ModelSource.open("./no/such/model")


def test_weights_file_instead_of_its_directory_is_not_found(tmp_path: Path) -> None:
    save_tiny_model("llama", tmp_path, num_layers=1)
    with pytest.raises(ModelNotFoundError, match="is not a model directory \\(a file, not a directory\\)"):
        ModelSource.open(tmp_path / "model.safetensors")


def test_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        ModelSource.open(tmp_path)


def test_config_without_weights_names_the_expected_files(tmp_path: Path) -> None:
    tiny_config("llama").save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="has no weights") as raised:
        ModelSource.open(tmp_path)
    assert all(name in str(raised.value) for name in WEIGHT_FILES)


def test_encoder_decoder_model_is_unsupported(tmp_path: Path) -> None:
    config = AutoConfig.for_model("t5", vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="t5 is an encoder-decoder model"):
        ModelSource.open(tmp_path)


def test_encoder_only_model_is_unsupported(tmp_path: Path) -> None:
    config = AutoConfig.for_model(
        "bert", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    AutoModelForMaskedLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"^bert: "):
        ModelSource.open(tmp_path)


def test_unknown_model_type_is_unsupported(tmp_path: Path) -> None:
    save_tiny_model("llama", tmp_path, num_layers=1)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "not-a-transformer"}))
    with pytest.raises(UnsupportedModelError, match="transformers cannot read this config"):
        ModelSource.open(tmp_path)
