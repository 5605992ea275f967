"""A model cut into block slices and run by hand gives the full model's logits and greedy tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer

from swarm.errors import ConfigError
from swarm.models import BlockSlice, ClientModules, ModelSource, load_block_slice, load_client_modules
from swarm.models.block_slice import BATCHED_DECODE_MAX_TOKENS, GrowingLayer, SessionKV
from swarm.models.session_attention import PER_SESSION_FAMILIES
from tests.model_factory import FAMILIES, FIRST_ORDINARY_TOKEN, VOCAB_SIZE, save_tiny_model

ATOL = 1e-4  # float32 logits; the measured difference is ~3e-7
SPANS = ((0, 1), (1, 3), (3, 4))  # uneven boundaries over the 4 blocks of a tiny model
PROMPT_LENGTH, PREFILL_SPLIT, NEW_TOKENS = 6, 4, 8  # prefill in two chunks of 4 and 2 tokens, then decode 8

SavedModel = tuple[PreTrainedModel, Path]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., SavedModel]:
    """Save each (family, sharded, safe_serialization) model once per module: saving dominates test time."""
    saved: dict[tuple[str, bool, bool], SavedModel] = {}

    def get(family: str, *, sharded: bool = False, safe_serialization: bool = True) -> SavedModel:
        key = (family, sharded, safe_serialization)
        if key not in saved:
            path = tmp_path_factory.mktemp(f"{family}-{'sharded' if sharded else 'single'}")
            saved[key] = (save_tiny_model(family, path, sharded=sharded, safe_serialization=safe_serialization), path)
        return saved[key]

    return get


def make_prompt(batch: int = 2, length: int = PROMPT_LENGTH, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (batch, length), generator=generator)


def generate_through_slices(
    client: ClientModules, slices: Sequence[BlockSlice], prompt: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding as a swarm client does it: one KV cache per slice, prefill in two chunks, then token by token.

    Returns the tokens (prompt included) and the logits at every position that predicted a token.
    """
    caches = [block_slice.new_cache() for block_slice in slices]

    def step(input_ids: torch.Tensor, position: int) -> torch.Tensor:
        hidden = client.embed(input_ids, position)
        for block_slice, cache in zip(slices, caches, strict=True):
            hidden = block_slice(hidden, cache=cache, position=position)
        return client.logits(hidden)

    with torch.inference_mode():
        logits = [step(prompt[:, :PREFILL_SPLIT], 0), step(prompt[:, PREFILL_SPLIT:], PREFILL_SPLIT)]
        tokens = prompt
        for index in range(new_tokens):
            next_token = logits[-1][:, -1:].argmax(-1)
            tokens = torch.cat([tokens, next_token], dim=1)
            if index < new_tokens - 1:
                logits.append(step(next_token, tokens.shape[1] - 1))
    return tokens, torch.cat(logits, dim=1)


def reference_greedy(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,  # random weights may emit EOS; decode a fixed number of tokens like the slices do
        )


def load_chain(path: Path, spans: Sequence[tuple[int, int]] = SPANS, dtype: str = "float32"):
    source = ModelSource.open(path)
    slices = [load_block_slice(source, start, end, dtype=dtype) for start, end in spans]
    return load_client_modules(source, dtype=dtype), slices


def assert_matches_full_model(model: PreTrainedModel, path: Path) -> None:
    client, slices = load_chain(path)
    prompt = make_prompt()
    tokens, logits = generate_through_slices(client, slices, prompt, NEW_TOKENS)
    with torch.inference_mode():
        expected_logits = model(tokens[:, :-1]).logits
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    assert torch.equal(tokens, reference_greedy(model, prompt, NEW_TOKENS))


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_chained_slices_match_full_model_logits_and_greedy_tokens(
    saved_model: Callable[..., SavedModel], family: str, sharded: bool
) -> None:
    assert_matches_full_model(*saved_model(family, sharded=sharded))


@pytest.mark.parametrize(
    ("family", "sharded"), [("llama", False), ("llama", True), ("gpt2", False)], ids=["llama", "llama-sharded", "gpt2"]
)
def test_pytorch_bin_checkpoint_slices_match_full_model(
    saved_model: Callable[..., SavedModel], family: str, sharded: bool
) -> None:
    model, path = saved_model(family, sharded=sharded, safe_serialization=False)
    assert not list(path.glob("*.safetensors"))
    assert_matches_full_model(model, path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stateless_forward_equals_cached_chunks(saved_model: Callable[..., SavedModel], family: str) -> None:
    _, path = saved_model(family)
    (block_slice,) = load_chain(path, spans=[(1, 4)])[1]
    hidden = torch.randn(2, 10, block_slice.hidden_size, generator=torch.Generator().manual_seed(2))
    cache = block_slice.new_cache()
    with torch.inference_mode():
        stateless = block_slice(hidden)
        # 10 tokens with a 4-token sliding window (qwen2, mistral): later chunks see only part of the cache
        chunks = [block_slice(hidden[:, :5], cache=cache, position=0)]
        chunks += [block_slice(hidden[:, i : i + 1], cache=cache, position=i) for i in range(5, 10)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), stateless, atol=ATOL, rtol=0)


def test_bfloat16_slice_runs_on_cpu_close_to_float32(saved_model: Callable[..., SavedModel]) -> None:
    _, path = saved_model("llama")
    source = ModelSource.open(path)
    full, half = load_block_slice(source, 0, 4), load_block_slice(source, 0, 4, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    hidden = torch.randn(2, 6, full.hidden_size, generator=torch.Generator().manual_seed(3))
    cache = half.new_cache()
    with torch.inference_mode():
        expected = full(hidden)
        prefill = half(hidden[:, :5].bfloat16(), cache=cache, position=0)
        decode = half(hidden[:, 5:].bfloat16(), cache=cache, position=5)
    actual = torch.cat([prefill, decode], dim=1).float()
    # measured: max abs error ~0.02 on outputs of magnitude ~4 (bfloat16 keeps 8 mantissa bits)
    torch.testing.assert_close(actual, expected, atol=0.1, rtol=0.05)


def test_float16_on_cpu_is_refused_with_a_hint(saved_model: Callable[..., SavedModel]) -> None:
    source = ModelSource.open(saved_model("llama")[1])
    with pytest.raises(ConfigError, match="float16 is for GPUs only; on CPU use bfloat16 or float32"):
        load_block_slice(source, 0, 1, dtype="float16")
    with pytest.raises(ConfigError, match="float16 is for GPUs only"):
        load_client_modules(source, dtype=torch.float16)


def test_step_at_a_position_the_cache_does_not_hold_is_refused(saved_model: Callable[..., SavedModel]) -> None:
    (block_slice,) = load_chain(saved_model("llama")[1], spans=[(0, 2)])[1]
    cache = block_slice.new_cache()
    hidden = torch.randn(1, 3, block_slice.hidden_size)
    with pytest.raises(ValueError, match="starts at position 2, but the cache holds 0 tokens"):
        block_slice(hidden, cache=cache, position=2)
    block_slice(hidden, cache=cache, position=0)
    with pytest.raises(ValueError, match="starts at position 0, but the cache holds 3 tokens"):
        block_slice(hidden[:, :1], cache=cache, position=0)
    assert cache.get_seq_length() == 3  # the refused step left the cache alone


# (rows, cached tokens) of each session
DIFFERENT_LENGTHS = [(1, 3), (2, 6), (1, 1), (1, 5)]
EQUAL_LENGTHS = [(1, 4), (2, 4), (1, 4)]  # no padding: no mask
# the second is longer than the others' buffers hold (SessionKV.MIN_CAPACITY): the batch pads theirs
PAST_CAPACITY = [(1, 2), (1, SessionKV.MIN_CAPACITY + 3), (2, 7)]
# long conversations: per session, past what joins a gathered batch; gathered, at its limit (a wide padded mask)
LONG_CACHES = [(1, 40), (1, 2 * BATCHED_DECODE_MAX_TOKENS), (2, 300)]
GATHERED_LONG_CACHES = [(1, 40), (1, BATCHED_DECODE_MAX_TOKENS), (2, 300)]


@pytest.mark.parametrize(
    ("family", "sessions", "per_session"),
    [(family, DIFFERENT_LENGTHS, True) for family in FAMILIES]
    + [("llama", sessions, per_session) for sessions in (EQUAL_LENGTHS, PAST_CAPACITY) for per_session in (True, False)]
    + [("llama", LONG_CACHES, True), ("qwen3", LONG_CACHES, True), ("llama", GATHERED_LONG_CACHES, False)],
)
def test_decode_steps_of_sessions_together_equal_each_alone(
    saved_model: Callable[..., SavedModel], family: str, sessions: list[tuple[int, int]], per_session: bool
) -> None:
    """Both ways a batch attends: per session (on a CPU, for the families that support it) and over the caches
    gathered into one (`per_session=False` turns the first off; the other families always gather)."""
    _, path = saved_model(family)
    (block_slice,) = load_chain(path, spans=[(1, 4)])[1]
    if not per_session:
        block_slice._per_session_attention = False
    assert block_slice.attends_per_session == (per_session and family in PER_SESSION_FAMILIES)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randn(rows, length, block_slice.hidden_size, generator=generator) for rows, length in sessions]
    steps = [torch.randn(rows, 1, block_slice.hidden_size, generator=generator) for rows, _ in sessions]
    with torch.inference_mode():
        alone, together = [], []
        for prompt, step in zip(prompts, steps, strict=True):
            cache = block_slice.new_cache()
            block_slice(prompt, cache=cache, position=0)
            alone.append(block_slice(step, cache=cache, position=prompt.shape[1]))
            alone.append(block_slice(step * 2, cache=cache, position=prompt.shape[1] + 1))  # and the next one
        caches = [block_slice.new_cache() for _ in sessions]
        for prompt, cache in zip(prompts, caches, strict=True):
            block_slice(prompt, cache=cache, position=0)
        if not all(block_slice.can_decode_together(cache) for cache in caches):
            assert family in ("qwen2", "mistral")  # sliding-window layers: these sessions decode one by one
            return
        rows = [count for count, _ in sessions]
        together += block_slice.decode_together(list(zip(steps, caches, strict=True))).split(rows)
        twice = [(step * 2, cache) for step, cache in zip(steps, caches, strict=True)]
        together += block_slice.decode_together(twice).split(rows)
    assert [cache.get_seq_length() for cache in caches] == [length + 2 for _, length in sessions]
    # a batch pads a shorter session for itself only: each buffer is still the size its own prompt made it
    capacities = [cache.layers[0].store.capacity for cache in caches]
    assert capacities == [max(2 * length, SessionKV.MIN_CAPACITY) for _, length in sessions]
    expected = alone[0::2] + alone[1::2]
    for ours, theirs in zip(together, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_growing_layer_appends_in_place_within_its_cap_and_rewrites_after_a_crop() -> None:
    """The cache layer sessions use: the same keys and values as transformers' DynamicLayer, grown by doubling up
    to the session's max_length, without a new buffer on most steps; a crop (rollback) keeps the buffer."""
    generator = torch.Generator().manual_seed(7)
    ours, theirs = GrowingLayer(max_length=100), DynamicLayer()
    buffers = set()
    for tokens in (3, 1, 1, 60, 1, 30):  # a prompt, decode steps, a long step, more
        keys, values = (torch.randn(2, 4, tokens, 8, generator=generator) for _ in range(2))
        for layer in (ours, theirs):
            layer.update(keys, values)
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        buffers.add(ours.store.keys.data_ptr())
    assert ours.get_seq_length() == 96
    assert ours.store.capacity == 100  # doubling stopped at max_length
    assert len(buffers) == 2  # 64 tokens for the prompt, then 130 capped to 100 for the long step
    ours.crop(-10)
    theirs.crop(-10)
    rewritten = [torch.randn(2, 4, 2, 8, generator=generator) for _ in range(2)]
    ours.update(*rewritten)
    theirs.update(*rewritten)
    assert (
        ours.get_seq_length() == 88 and torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    )


def test_a_sessions_layers_share_one_store_unless_shaped_differently() -> None:
    """All layers of a session live in one SessionKV, which grows for all at once; a layer whose states are shaped
    unlike the first layer's keeps a store of its own."""
    store = SessionKV(num_layers=3)
    layers = [GrowingLayer(store=store, index=index) for index in range(3)]
    generator = torch.Generator().manual_seed(1)
    steps = []
    for tokens in (5, SessionKV.MIN_CAPACITY):  # the second step grows the buffer of all layers
        states = [[torch.randn(1, 2, tokens, 4, generator=generator) for _ in range(2)] for _ in layers]
        for layer, (keys, values) in zip(layers, states, strict=True):
            layer.update(keys, values)
        steps.append(states)
    assert store.keys.shape == (3, 1, 2, 2 * (5 + SessionKV.MIN_CAPACITY), 4)
    assert all(layer.store is store for layer in layers)
    for index, layer in enumerate(layers):  # both steps' states, the first carried over into the grown buffer
        keys, values = (torch.cat([states[index][kind] for states in steps], dim=-2) for kind in (0, 1))
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)

    odd = GrowingLayer(store=store, index=0)  # head_dim 8, where the store holds 4
    odd.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    assert odd.store is not store and odd.get_seq_length() == 1


@pytest.mark.parametrize(("family", "per_session"), [("llama", True), ("llama", False), ("bloom", True)])
def test_long_caches_join_a_batch_of_decode_steps_only_where_it_attends_per_session(
    saved_model: Callable[..., SavedModel], family: str, per_session: bool
) -> None:
    _, path = saved_model(family)
    (block_slice,) = load_chain(path, spans=[(0, 2)])[1]
    if not per_session:
        block_slice._per_session_attention = False
    cache = block_slice.new_cache()
    assert not block_slice.can_decode_together(cache)  # empty: nothing to decode after
    with torch.inference_mode():
        block_slice(torch.randn(1, BATCHED_DECODE_MAX_TOKENS, block_slice.hidden_size), cache=cache, position=0)
        assert block_slice.can_decode_together(cache)
        block_slice(torch.randn(1, 1, block_slice.hidden_size), cache=cache, position=BATCHED_DECODE_MAX_TOKENS)
    # longer: copying it into a gathered batch costs more than the batch saves; attending per session copies nothing
    assert block_slice.can_decode_together(cache) == block_slice.attends_per_session
    assert block_slice.attends_per_session == (per_session and family == "llama")  # bloom: ALiBi, its own attention
