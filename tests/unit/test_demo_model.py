"""The demo model: built locally, loadable offline by transformers, safe to build from several processes at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import swarm.demo_model as demo_model
from swarm.demo_model import DEMO_MODEL_ENV, DemoModelSpec, demo_model_dir, ensure_demo_model, is_complete

TEXTS = [
    "It was the best of times, it was the worst of times.",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnew lines\n\n",
    "unicode: naïve café, 東京, emoji 🐝, math ∑",
    "code: def f(x: int) -> int:\n    return {x: [x ** 2]}",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")


def test_loads_with_auto_classes_from_the_directory_alone(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)

    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == DemoModelSpec().num_layers
    assert model.config.vocab_size == len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, name) == getattr(model.generation_config, name) == getattr(tokenizer, name)
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(model_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    ids = tokenizer(text).input_ids

    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_learned_merges_from_its_corpus(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    text = "It was the best of times"

    assert len(tokenizer(text, add_special_tokens=False).input_ids) < len(text) / 2


def test_greedy_generation_prints_only_printable_text(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    input_ids = tokenizer("Alice was", return_tensors="pt").input_ids

    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=40)

    text = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert text.replace("\n", "").isprintable()
    assert "\N{REPLACEMENT CHARACTER}" not in text


def test_builds_identical_files_every_time(tmp_path: Path) -> None:
    first, second = ensure_demo_model(tmp_path / "a"), ensure_demo_model(tmp_path / "b")

    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_existing_model_is_reused_untouched(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    modified = weights.stat().st_mtime_ns

    assert ensure_demo_model(model_dir) == model_dir
    assert weights.stat().st_mtime_ns == modified


def test_fills_an_empty_directory_and_leaves_no_temporary_one(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()

    ensure_demo_model(tmp_path / "model")

    assert is_complete(tmp_path / "model")
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_refuses_a_directory_holding_other_files(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")

    with pytest.raises(FileExistsError, match=DEMO_MODEL_ENV):
        ensure_demo_model(tmp_path / "model")
    assert [path.name for path in (tmp_path / "model").iterdir()] == ["notes.txt"]


def test_losing_the_race_to_another_process_uses_its_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model"
    build = demo_model.save_demo_model

    def build_while_another_process_finishes_first(directory: Path, spec: DemoModelSpec) -> None:
        build(directory, spec)
        build(target, spec)  # the other process's rename lands before ours

    monkeypatch.setattr(demo_model, "save_demo_model", build_while_another_process_finishes_first)

    assert ensure_demo_model(target) == target
    assert is_complete(target)
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(directory: Path, spec: DemoModelSpec) -> None:
        (directory / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo_model, "save_demo_model", crash)

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_directory_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DEMO_MODEL_ENV, str(tmp_path / "elsewhere"))
    assert demo_model_dir() == tmp_path / "elsewhere"

    monkeypatch.delenv(DEMO_MODEL_ENV)
    assert demo_model_dir() == Path.home() / ".cache" / "blockswarm" / "demo-model"
