"""A peer's decode batches run on the event loop's own thread (two hand-offs between threads fewer), one session's
or several; while a job holds the device, with steps of several spans waiting, or once a batch was slow, they run
in the executor thread. Outputs are the same either way."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import peer.runtime
from peer.runtime import INLINE_DECODE_MAX_S, BlockRuntime
from swarm.client._sync import run_sync
from swarm.models import BlockSlice

STEP_TIMEOUT_S = 60.0
PROMPT_TOKENS = 3


@pytest.fixture
def decode_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread that ran each decode step."""
    threads: list[str] = []
    decode = peer.runtime._decode_together

    def noted(*args: object) -> list[torch.Tensor]:
        threads.append(threading.current_thread().name)
        return decode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(peer.runtime, "_decode_together", noted)
    return threads


def _states(block_slice: BlockSlice, seq: int, seed: int) -> torch.Tensor:
    return torch.randn(1, seq, block_slice.hidden_size, generator=torch.Generator().manual_seed(seed))


def _prefilled(block_slice: BlockSlice, seed: int) -> object:
    cache = block_slice.new_cache()
    with torch.inference_mode():
        block_slice(_states(block_slice, PROMPT_TOKENS, seed), cache=cache, position=0)
    return cache


def _expected(block_slice: BlockSlice, seed: int, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    cache = _prefilled(block_slice, seed)
    with torch.inference_mode():
        return [block_slice(s, cache=cache, position=PROMPT_TOKENS + i) for i, s in enumerate(steps)]


def test_a_lone_sessions_decode_steps_run_on_the_loop_with_unchanged_outputs(
    block_slice: BlockSlice, decode_threads: list[str]
) -> None:
    runtime = BlockRuntime(block_slice)
    cache = _prefilled(block_slice, seed=0)
    steps = [_states(block_slice, 1, seed=10 + i) for i in range(3)]

    async def decode() -> tuple[list[torch.Tensor], str]:
        outputs = [
            await asyncio.wait_for(runtime.inference_step(block_slice, cache, s, PROMPT_TOKENS + i), STEP_TIMEOUT_S)
            for i, s in enumerate(steps)
        ]
        return outputs, threading.current_thread().name

    try:
        outputs, loop_thread = run_sync(decode())
    finally:
        runtime.close()
    assert decode_threads == [loop_thread] * 3
    for output, expected in zip(outputs, _expected(block_slice, 0, steps), strict=True):
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)


def test_a_batch_of_several_sessions_runs_on_the_loop_with_unchanged_outputs(
    block_slice: BlockSlice, decode_threads: list[str]
) -> None:
    runtime = BlockRuntime(block_slice)
    caches = [_prefilled(block_slice, seed) for seed in range(3)]
    step = _states(block_slice, 1, seed=10)

    async def together() -> tuple[list[torch.Tensor], str]:
        steps = [runtime.inference_step(block_slice, cache, step, PROMPT_TOKENS) for cache in caches]
        return await asyncio.wait_for(asyncio.gather(*steps), STEP_TIMEOUT_S), threading.current_thread().name

    try:
        outputs, loop_thread = run_sync(together())
    finally:
        runtime.close()
    assert decode_threads == [loop_thread]  # one batch
    for seed, output in enumerate(outputs):
        torch.testing.assert_close(output, _expected(block_slice, seed, [step])[0], atol=1e-5, rtol=0)


def test_steps_of_different_spans_waiting_together_run_in_the_executor(
    block_slice: BlockSlice, decode_threads: list[str]
) -> None:
    """Two batches in a row on the loop would hold the first one's answers back while the second computes."""
    runtime = BlockRuntime(block_slice)
    first_block = runtime.span(0, 1)
    whole, part = _prefilled(block_slice, seed=0), first_block.new_cache()
    with torch.inference_mode():
        first_block(_states(block_slice, PROMPT_TOKENS, seed=1), cache=part, position=0)
    step = _states(block_slice, 1, seed=10)

    async def together() -> None:
        steps = [
            runtime.inference_step(block_slice, whole, step, PROMPT_TOKENS),
            runtime.inference_step(first_block, part, step, PROMPT_TOKENS),
        ]
        await asyncio.wait_for(asyncio.gather(*steps), STEP_TIMEOUT_S)

    try:
        run_sync(together())
    finally:
        runtime.close()
    assert len(decode_threads) == 2 and all(name.startswith("block-runtime") for name in decode_threads)


def test_a_decode_step_waits_for_the_job_that_holds_the_device(
    block_slice: BlockSlice, decode_threads: list[str]
) -> None:
    runtime = BlockRuntime(block_slice)
    cache = _prefilled(block_slice, seed=0)
    job_running, release_job = threading.Event(), threading.Event()
    order: list[str] = []

    def job() -> None:
        job_running.set()
        assert release_job.wait(STEP_TIMEOUT_S)
        order.append("job")

    async def scenario() -> None:
        held = asyncio.ensure_future(runtime._run(job))
        assert await asyncio.to_thread(job_running.wait, STEP_TIMEOUT_S)
        step = asyncio.ensure_future(runtime.inference_step(block_slice, cache, _states(block_slice, 1, 10), 3))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not step.done()  # it did not run on the loop beside the job
        release_job.set()
        await asyncio.wait_for(asyncio.gather(held, step), STEP_TIMEOUT_S)
        order.append("decode")

    try:
        run_sync(scenario())
    finally:
        runtime.close()
    assert order == ["job", "decode"]
    assert len(decode_threads) == 1 and decode_threads[0].startswith("block-runtime")


def test_a_slow_decode_step_moves_the_next_ones_to_the_executor(
    block_slice: BlockSlice, decode_threads: list[str]
) -> None:
    runtime = BlockRuntime(block_slice)
    cache = _prefilled(block_slice, seed=0)

    async def two_steps() -> None:
        for i in range(2):
            runtime.last_decode_batch_s = INLINE_DECODE_MAX_S  # as if the last step had taken this long
            step = runtime.inference_step(block_slice, cache, _states(block_slice, 1, 10 + i), PROMPT_TOKENS + i)
            await asyncio.wait_for(step, STEP_TIMEOUT_S)

    try:
        run_sync(two_steps())
    finally:
        runtime.close()
    assert len(decode_threads) == 2 and all(name.startswith("block-runtime") for name in decode_threads)
