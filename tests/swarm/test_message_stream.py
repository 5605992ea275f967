"""`swarm.message_stream` between real hivemind P2P daemons on 127.0.0.1: it speaks hivemind's own stream framing
both ways, a handler's failure reaches the caller as hivemind's handler error, and a caller that drops its stream
cancels the handler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

from swarm.message_stream import MessageStream, serve_message_streams
from swarm.testing import LOOPBACK

ECHO = "test.echo"


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout=60))


async def _between_two_daemons(test: Callable[[P2P, P2P], Awaitable[None]]) -> None:
    server = await P2P.create(host_maddrs=[LOOPBACK])
    client = None
    try:
        client = await P2P.create(host_maddrs=[LOOPBACK], initial_peers=await server.get_visible_maddrs())
        await test(server, client)
    finally:
        if client is not None:
            await client.shutdown()
        await server.shutdown()


async def _echo(
    requests: AsyncIterator[runtime_pb2.ExpertRequest], _: P2PContext
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    async for request in requests:
        yield runtime_pb2.ExpertResponse(metadata=request.metadata)


def _request(text: str) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(metadata=text.encode())


def test_a_message_stream_and_hiveminds_own_streams_understand_each_other() -> None:
    async def test(server: P2P, client: P2P) -> None:
        await serve_message_streams(server, ECHO, _echo, runtime_pb2.ExpertRequest)
        await server.add_protobuf_handler(
            "test.hivemind_echo", _echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        # hivemind's caller, this module's handler
        replies = await client.iterate_protobuf_handler(
            server.peer_id, ECHO, as_aiter(_request("a"), _request("b")), runtime_pb2.ExpertResponse
        )
        assert [reply.metadata async for reply in replies] == [b"a", b"b"]
        # this module's caller, hivemind's handler; then this module on both ends
        for name in ("test.hivemind_echo", ECHO):
            stream = await MessageStream.open(client, server.peer_id, name)
            for text in ("first", "second"):
                stream.send(_request(text))
                reply = await stream.receive(runtime_pb2.ExpertResponse)
                assert reply is not None and reply.metadata == text.encode()
            stream.end()
            assert await stream.receive(runtime_pb2.ExpertResponse) is None  # the handler ended its side too
            stream.close()

    _run(_between_two_daemons(test))


def test_a_failing_handler_reaches_the_caller_as_hiveminds_handler_error() -> None:
    async def failing(
        requests: AsyncIterator[runtime_pb2.ExpertRequest], _: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for request in requests:
            yield runtime_pb2.ExpertResponse(metadata=request.metadata)
            raise ValueError("the handler broke")

    async def test(server: P2P, client: P2P) -> None:
        await serve_message_streams(server, ECHO, failing, runtime_pb2.ExpertRequest)
        stream = await MessageStream.open(client, server.peer_id, ECHO)
        stream.send(_request("x"))
        reply = await stream.receive(runtime_pb2.ExpertResponse)
        assert reply is not None and reply.metadata == b"x"
        with pytest.raises(P2PHandlerError, match="the handler broke"):
            await stream.receive(runtime_pb2.ExpertResponse)
        stream.close()

    _run(_between_two_daemons(test))


def test_a_caller_that_drops_its_stream_cancels_the_handler() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def waiting(
        requests: AsyncIterator[runtime_pb2.ExpertRequest], _: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        await anext(requests)
        started.set()
        try:
            await asyncio.Event().wait()  # a step that never finishes
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield runtime_pb2.ExpertResponse()

    async def test(server: P2P, client: P2P) -> None:
        await serve_message_streams(server, ECHO, waiting, runtime_pb2.ExpertRequest)
        stream = await MessageStream.open(client, server.peer_id, ECHO)
        stream.send(_request("x"))
        await asyncio.wait_for(started.wait(), 10)
        stream.close()  # without ending the stream
        await asyncio.wait_for(cancelled.wait(), 10)

    _run(_between_two_daemons(test))
