"""The shipped demo model: complete, small, loadable offline by transformers, with a tokenizer that round-trips text;
and `ensure_demo_model`, which copies it where a test or user wants it, safely from several processes at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import swarm.demo_model as demo_model
from swarm.demo_model import (
    DEMO_MODEL_ENV,
    SHIPPED_DEMO_MODEL_DIR,
    demo_model_dir,
    ensure_demo_model,
    is_complete,
)

MAX_SIZE_BYTES = 25_000_000
TEXTS = [
    "To be, or not to be, that is the question:",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnew lines\n\n",
    "unicode: naïve café, 東京, emoji 🐝, math ∑",
    "code: def f(x: int) -> int:\n    return {x: [x ** 2]}",
]
LOAD_OFFLINE = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps({"type": model.config.model_type, "layers": model.config.num_hidden_layers,
                  "dtype": str(model.dtype), "vocab": model.config.vocab_size, "tokens": len(tokenizer)}))
"""


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(SHIPPED_DEMO_MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(SHIPPED_DEMO_MODEL_DIR, local_files_only=True).eval()


def test_shipped_model_is_complete_and_under_25_mb() -> None:
    assert is_complete(SHIPPED_DEMO_MODEL_DIR)
    assert sum(path.stat().st_size for path in SHIPPED_DEMO_MODEL_DIR.iterdir()) < MAX_SIZE_BYTES


def test_loads_with_auto_classes_with_the_hub_offline() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", LOAD_OFFLINE, str(SHIPPED_DEMO_MODEL_DIR)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout)
    assert loaded["type"] == "llama" and loaded["layers"] >= 6 and loaded["dtype"] == "torch.float32"
    assert loaded["vocab"] == loaded["tokens"]


def test_special_tokens_agree_between_tokenizer_model_and_generation_config(
    tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module
) -> None:
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, name) == getattr(model.generation_config, name) == getattr(tokenizer, name)
    assert not model.generation_config.do_sample  # generate() is greedy unless asked, so the demo is repeatable


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer(text).input_ids

    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_learned_english_words(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Now is the winter of our discontent made glorious summer"

    assert len(tokenizer(text, add_special_tokens=False).input_ids) < len(text) / 3  # bytes alone: one per character


def test_greedy_continuation_is_printable_text(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> None:
    input_ids = tokenizer("ROMEO.\n", return_tensors="pt").input_ids

    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=16)

    text = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert text.strip() and text.replace("\n", "").isprintable()


def test_training_log_records_a_falling_loss_curve(model: torch.nn.Module) -> None:
    log = json.loads((SHIPPED_DEMO_MODEL_DIR / "training_log.json").read_text())

    curve = log["curve"]
    assert len(curve) >= 2 and curve[-1]["validation_loss"] < curve[0]["validation_loss"]
    assert log["final"]["validation_loss"] < curve[0]["validation_loss"]
    assert log["settings"]["num_layers"] == model.config.num_hidden_layers
    assert log["parameters"] == sum(p.numel() for p in model.parameters())


def test_copies_the_shipped_model_into_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()

    assert ensure_demo_model(tmp_path / "model") == tmp_path / "model"

    for path in SHIPPED_DEMO_MODEL_DIR.iterdir():
        assert (tmp_path / "model" / path.name).read_bytes() == path.read_bytes(), path.name
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # no temporary directory left


def test_the_default_is_the_shipped_model_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEMO_MODEL_ENV, raising=False)

    assert demo_model_dir() == SHIPPED_DEMO_MODEL_DIR
    assert ensure_demo_model() == SHIPPED_DEMO_MODEL_DIR


def test_directory_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DEMO_MODEL_ENV, str(tmp_path / "elsewhere"))

    assert demo_model_dir() == tmp_path / "elsewhere"
    assert ensure_demo_model() == tmp_path / "elsewhere" and is_complete(tmp_path / "elsewhere")


def test_existing_model_is_reused_untouched(tmp_path: Path) -> None:
    weights = ensure_demo_model(tmp_path / "model") / "model.safetensors"
    modified = weights.stat().st_mtime_ns

    assert ensure_demo_model(tmp_path / "model") == tmp_path / "model"
    assert weights.stat().st_mtime_ns == modified


def test_refuses_a_directory_holding_other_files(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")

    with pytest.raises(FileExistsError, match=DEMO_MODEL_ENV):
        ensure_demo_model(tmp_path / "model")
    assert [path.name for path in (tmp_path / "model").iterdir()] == ["notes.txt"]


def test_losing_the_race_to_another_process_uses_its_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model"
    copy = demo_model.copy_demo_model

    def copy_while_another_process_finishes_first(directory: Path) -> None:
        copy(directory)
        target.mkdir()
        copy(target)  # the other process's rename lands before ours

    monkeypatch.setattr(demo_model, "copy_demo_model", copy_while_another_process_finishes_first)

    assert ensure_demo_model(target) == target
    assert is_complete(target)
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_a_failed_copy_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(directory: Path) -> None:
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(demo_model, "copy_demo_model", crash)

    with pytest.raises(OSError, match="disk full"):
        ensure_demo_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
