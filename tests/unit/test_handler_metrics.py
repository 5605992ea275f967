"""`BlockHandler` records each RPC's outcome from the reply it sends: ok, the `ErrorReply` kind, or cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
import torch
from hivemind.proto import runtime_pb2
from prometheus_client import CollectorRegistry

from monitoring.peer_metrics import PeerMetrics
from peer.handler import BlockHandler, HandlerLimits
from peer.kv_cache import KVCacheBudget
from swarm import messages
from swarm.protocol import ErrorKind, ErrorReply


def _handler() -> BlockHandler:
    limits = HandlerLimits(
        inference_max_length=16,
        max_batch_size=1,
        session_idle_timeout=1.0,
        max_sessions_per_client=1,
        max_requests_per_client=1,
        max_message_bytes=2**20,
    )
    return BlockHandler(None, KVCacheBudget(16), limits, lambda: None, metrics=PeerMetrics(CollectorRegistry()))  # type: ignore[arg-type]


def _count(handler: BlockHandler, rpc: str, status: str) -> float | None:
    return handler.metrics.registry.get_sample_value("blockswarm_rpc_requests_total", {"rpc": rpc, "status": status})


def test_unary_rpcs_are_counted_by_the_kind_of_their_reply() -> None:
    handler = _handler()
    replies = iter(
        [messages.response([torch.ones(1, 1, 4)]), messages.error_response(ErrorReply(ErrorKind.CACHE_FULL, "full"))]
    )

    async def answer(request: runtime_pb2.ExpertRequest, context: object) -> runtime_pb2.ExpertResponse:
        return next(replies)

    measured = handler._measured("forward", answer)  # type: ignore[arg-type]
    request = messages.request([torch.ones(1, 2, 4)])
    for _ in range(2):
        _run(measured(request, None))  # type: ignore[arg-type]
    assert _count(handler, "forward", "ok") == 1
    assert _count(handler, "forward", "cache_full") == 1
    assert (
        handler.metrics.registry.get_sample_value("blockswarm_network_bytes_total", {"direction": "in"})
        == 2 * request.ByteSize()
    )
    assert handler.metrics.registry.get_sample_value("blockswarm_rpc_in_flight", {"rpc": "forward"}) == 0


def test_a_stream_counts_its_last_reply_and_a_cancelled_one_counts_as_cancelled() -> None:
    handler = _handler()

    async def failing(
        requests: AsyncIterator[runtime_pb2.ExpertRequest], context: object
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for _ in requests:
            yield messages.response([torch.ones(1, 1, 4)])
        yield messages.error_response(ErrorReply(ErrorKind.BAD_REQUEST, "no"))

    async def hanging(
        requests: AsyncIterator[runtime_pb2.ExpertRequest], context: object
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        yield messages.response([torch.ones(1, 1, 4)])
        await asyncio.Event().wait()

    async def two_requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        for _ in range(2):
            yield messages.request([torch.ones(1, 1, 4)])

    async def run() -> None:
        replies = [reply async for reply in handler._measured_stream("inference", failing)(two_requests(), None)]  # type: ignore[arg-type]
        assert len(replies) == 3
        stream = handler._measured_stream("inference", hanging)(two_requests(), None)  # type: ignore[arg-type]
        await anext(stream)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(anext(stream), timeout=0.05)
        await stream.aclose()

    _run(run())
    assert _count(handler, "inference", "bad_request") == 1
    assert _count(handler, "inference", "cancelled") == 1
    assert _count(handler, "inference", "ok") == 0
    assert handler.metrics.registry.get_sample_value("blockswarm_rpc_duration_seconds_count", {"rpc": "inference"}) == 2


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run on a private loop: asyncio.run would reset the main thread's loop that the session owns."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()
