"""`swarm finetune`'s data path and configs: examples from .txt/.jsonl, equal-length token chunks, batches,
averaging codecs and config validation (no swarm needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hivemind.compression import CompressionInfo
from transformers import AutoTokenizer

from swarm.compression import averaging_codec
from swarm.errors import ConfigError
from swarm.training import CollaborationConfig
from swarm.training.trainer import batches, read_examples, token_chunks
from tests.model_factory import EOS_TOKEN_ID, save_byte_tokenizer


def test_reads_txt_lines_and_jsonl_text_fields(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\n  \nsecond line\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert read_examples(txt) == ["first line", "second line"]
    assert read_examples(jsonl) == ["one", "two"]


def test_rejects_jsonl_lines_without_text(tmp_path: Path) -> None:
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"prompt": "no"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        read_examples(jsonl)


def test_chunks_concatenate_examples_with_eos_and_drop_the_remainder(tmp_path: Path) -> None:
    save_byte_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    chunks = token_chunks(["abc", "de"], tokenizer, seq_len=3)  # a b c </s> d e </s>: 7 tokens
    assert chunks.shape == (2, 3)
    assert chunks[1, 0].item() == EOS_TOKEN_ID
    assert tokenizer.decode(chunks[0]) == "abc"
    assert token_chunks(["ab"], tokenizer, seq_len=64).shape == (1, 3)  # shorter than one chunk: one short chunk


def test_batches_cover_every_chunk_each_pass() -> None:
    chunks = torch.arange(10).unsqueeze(1)
    stream = batches(chunks, batch_size=5, seed=0)
    first_pass = torch.cat([next(stream), next(stream)]).flatten().tolist()
    assert sorted(first_pass) == list(range(10))
    assert next(batches(torch.arange(2).unsqueeze(1), batch_size=5, seed=0)).shape == (5, 1)  # tiny dataset


def test_averaging_codecs_round_trip_gradients() -> None:
    gradient = torch.randn(300, 300)  # above the 8-bit threshold of 65k elements
    # relative error of the whole tensor: 8-bit clips the few outliers, so no elementwise bound fits it
    for name, max_error in (("none", 0.0), ("fp16", 1e-3), ("8bit", 0.03)):  # 8bit measured 0.016
        codec = averaging_codec(name)
        restored = codec.extract(codec.compress(gradient, CompressionInfo.from_tensor(gradient)))
        assert float((restored - gradient).norm() / gradient.norm()) <= max_error, name
    with pytest.raises(ValueError, match="unknown averaging compression"):
        averaging_codec("4bit")


@pytest.mark.parametrize(
    "changes",
    [
        dict(run_id=""),
        dict(target_batch_size=0),
        dict(matchmaking_time=0.0),
        dict(compression="zip"),
        dict(local_steps=0),
        dict(outer_lr=0.0),
        dict(outer_momentum=1.0),
    ],
)
def test_collaboration_config_rejects_bad_values(changes: dict[str, object]) -> None:
    fields: dict[str, object] = dict(run_id="run", target_batch_size=64, batch_size_per_step=4) | changes
    with pytest.raises(ConfigError):
        CollaborationConfig(**fields)  # type: ignore[arg-type]
