"""A peer's decode step waits for the steps of the other sessions decoding through the same blocks, so that one
batch serves them (`BlockRuntime.decode_gather_s`), but only while fewer than half of those sessions are waiting:
a lone session, or two, never wait. The wait is also capped by the last batch's duration, which these tests set
as long as the window, as if the device were slow."""

from __future__ import annotations

import asyncio

import torch

from peer.runtime import BlockRuntime
from swarm.client._sync import run_sync
from swarm.models import BlockSlice

NEVER_S = 600.0  # a gathering window no test may wait out: a step that waited for it would fail its test's timeout
STEP_TIMEOUT_S = 60.0


def _prefilled_caches(block_slice: BlockSlice, count: int) -> list:
    caches = []
    for seed in range(count):
        cache = block_slice.new_cache()
        with torch.inference_mode():
            block_slice(_states(block_slice, 3, seed), cache=cache, position=0)
        caches.append(cache)
    return caches


def _states(block_slice: BlockSlice, seq: int, seed: int) -> torch.Tensor:
    return torch.randn(1, seq, block_slice.hidden_size, generator=torch.Generator().manual_seed(seed))


async def _loop_turns(count: int = 20) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_step_waits_for_the_other_decoding_sessions_and_one_batch_serves_them(block_slice: BlockSlice) -> None:
    batches: list[int] = []
    runtime = BlockRuntime(block_slice, on_decode_batch=batches.append, decode_gather_s=NEVER_S)
    a, b, c = _prefilled_caches(block_slice, 3)
    alone = {}
    for name, cache in zip("abc", _prefilled_caches(block_slice, 3), strict=True):
        with torch.inference_mode():
            alone[name] = block_slice(_states(block_slice, 1, 10), cache=cache, position=3)

    def step(cache: object) -> asyncio.Future[torch.Tensor]:
        return asyncio.ensure_future(runtime.inference_step(block_slice, cache, _states(block_slice, 1, 10), 3))

    async def scenario() -> None:
        await asyncio.wait_for(asyncio.gather(step(a), step(b), step(c)), STEP_TIMEOUT_S)  # now all three decode
        assert batches == [3]
        runtime.last_decode_batch_s = NEVER_S
        for cache in (a, b, c):
            runtime.block_slice.rollback(cache, 3)

        first = step(a)
        await _loop_turns()
        assert not first.done() and batches == [3]  # b and c are expected: a waits for them
        second = step(b)  # half of the three are here: the batch goes
        outputs = await asyncio.wait_for(asyncio.gather(first, second), STEP_TIMEOUT_S)
        assert batches == [3, 2]
        torch.testing.assert_close(outputs[0], alone["a"], atol=1e-5, rtol=0)
        torch.testing.assert_close(outputs[1], alone["b"], atol=1e-5, rtol=0)

        runtime.block_slice.rollback(a, 3)
        runtime.last_decode_batch_s = NEVER_S
        third = step(c)
        await _loop_turns()
        assert not third.done()  # a and b decode too
        await asyncio.wait_for(asyncio.gather(third, step(a)), STEP_TIMEOUT_S)
        assert batches == [3, 2, 2]

    try:
        run_sync(scenario())
    finally:
        runtime.close()


def test_one_or_two_decoding_sessions_never_wait(block_slice: BlockSlice) -> None:
    batches: list[int] = []
    runtime = BlockRuntime(block_slice, on_decode_batch=batches.append, decode_gather_s=NEVER_S)
    a, b = _prefilled_caches(block_slice, 2)

    async def decode(cache: object, position: int) -> None:
        runtime.last_decode_batch_s = NEVER_S  # each batch sets it to its own short duration
        step = runtime.inference_step(block_slice, cache, _states(block_slice, 1, position), position)
        await asyncio.wait_for(step, STEP_TIMEOUT_S)

    async def scenario() -> None:
        for position in range(3, 6):  # one session: each step runs at once
            await decode(a, position)
        for position in range(3, 6):  # two sessions in turn: each step runs without the other's
            await decode(b, position)
            await decode(a, position + 3)

    try:
        run_sync(scenario())
    finally:
        runtime.close()
    assert batches == [1] * 9


def test_a_step_waits_no_longer_than_the_last_batch_took(block_slice: BlockSlice) -> None:
    """Waiting longer than a batch takes would cost more than running the steps apart."""
    batches: list[int] = []
    runtime = BlockRuntime(block_slice, on_decode_batch=batches.append, decode_gather_s=NEVER_S)
    caches = _prefilled_caches(block_slice, 3)

    async def scenario() -> None:
        steps = [runtime.inference_step(block_slice, cache, _states(block_slice, 1, 4), 3) for cache in caches]
        await asyncio.wait_for(asyncio.gather(*steps), STEP_TIMEOUT_S)
        runtime.last_decode_batch_s = 0.0  # an instant device
        step = runtime.inference_step(block_slice, caches[0], _states(block_slice, 1, 5), 4)
        await asyncio.wait_for(step, STEP_TIMEOUT_S)  # the other two are expected, yet it runs alone

    try:
        run_sync(scenario())
    finally:
        runtime.close()
    assert batches == [3, 1]
