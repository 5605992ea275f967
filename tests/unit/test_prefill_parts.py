"""A long prompt step runs in parts on the peer: its output equals the whole step's, and a decode step of another
session that arrives meanwhile runs between the parts instead of after the whole prompt."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable

import pytest
import torch

import peer.runtime
from peer.runtime import BlockRuntime
from swarm.client._sync import run_sync
from swarm.models import BlockSlice

PROMPT_TOKENS = 13
PART_TOKENS = 4  # 13 tokens: parts of 4, 4, 4 and 1


def _states(block_slice: BlockSlice, seq: int, seed: int) -> torch.Tensor:
    return torch.randn(1, seq, block_slice.hidden_size, generator=torch.Generator().manual_seed(seed))


def test_a_prompt_in_parts_gives_the_whole_prompts_output_and_cache(block_slice: BlockSlice) -> None:
    prompt = _states(block_slice, PROMPT_TOKENS, seed=0)
    whole_cache, parts_cache = block_slice.new_cache(), block_slice.new_cache()
    with torch.inference_mode():
        whole = block_slice(prompt, cache=whole_cache, position=0)
    runtime = BlockRuntime(block_slice, prefill_chunk_tokens=PART_TOKENS)
    try:
        in_parts = run_sync(runtime.inference_step(block_slice, parts_cache, prompt, 0))
    finally:
        runtime.close()
    torch.testing.assert_close(in_parts, whole, atol=1e-5, rtol=0)
    assert parts_cache.get_seq_length() == PROMPT_TOKENS


def test_a_decode_step_runs_between_the_parts_of_a_long_prompt(
    block_slice: BlockSlice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first part holds the device until the other session's decode step is queued; that step must then run
    before the prompt's second part."""
    part_running, decode_queued = threading.Event(), threading.Event()
    ran: list[str] = []
    part, decode = peer.runtime._inference_step, peer.runtime._decode_together

    def first_part_waits(*args: object) -> torch.Tensor:
        if not ran:
            part_running.set()
            assert decode_queued.wait(timeout=30), "the decode step was never queued"
        ran.append("part")
        return part(*args)  # type: ignore[arg-type]

    def logged_decode(*args: object) -> list[torch.Tensor]:
        ran.append("decode")
        return decode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(peer.runtime, "_inference_step", first_part_waits)
    monkeypatch.setattr(peer.runtime, "_decode_together", logged_decode)
    runtime = BlockRuntime(block_slice, prefill_chunk_tokens=PART_TOKENS)

    async def run_noting_decodes(fn: Callable[..., object], *args: object) -> object:
        job = asyncio.get_running_loop().run_in_executor(
            runtime._executor, functools.partial(peer.runtime.holding, runtime._device, fn, *args)
        )
        if fn is logged_decode:  # queued behind the running part
            decode_queued.set()
        return await job

    monkeypatch.setattr(runtime, "_run", run_noting_decodes)
    other_cache = block_slice.new_cache()
    with torch.inference_mode():
        block_slice(_states(block_slice, 3, seed=1), cache=other_cache, position=0)

    async def both() -> None:
        prompt = asyncio.ensure_future(
            runtime.inference_step(block_slice, block_slice.new_cache(), _states(block_slice, PROMPT_TOKENS, 2), 0)
        )
        assert await asyncio.to_thread(part_running.wait, 30), "the prompt's first part never ran"
        decode_step = runtime.inference_step(block_slice, other_cache, _states(block_slice, 1, seed=3), 3)
        await asyncio.gather(prompt, decode_step)

    try:
        run_sync(both())
    finally:
        runtime.close()
    assert ran == ["part", "decode", "part", "part", "part"]
