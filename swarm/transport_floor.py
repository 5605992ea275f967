"""The transport's floor: a hidden state's round trip through two hivemind P2P daemons on this machine, with nothing
of blockswarm's on either side.

`swarm bench` sets the swarm's overhead over the local model against it: every message of a session passes from
Python to one `p2pd`, to the other, and to Python again, and no peer can answer faster than that. Both endpoints
live in this process (each with its own daemon, as every peer has), one echoing what the other sends on one
long-lived stream, as an inference session's steps travel.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from swarm import messages

ECHO = "blockswarm.bench_echo"
WARM_UP_ROUND_TRIPS = 20


async def _echo(
    requests: AsyncIterator[runtime_pb2.ExpertRequest], _: P2PContext
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    async for request in requests:
        yield runtime_pb2.ExpertResponse(tensors=request.tensors)


async def raw_round_trip_seconds(payload: torch.Tensor, round_trips: int) -> float:
    """Median seconds for `payload` to go to an echoing endpoint and back, serialised and deserialised as a
    session's hidden states are (`swarm.messages`), over one stream between two loopback daemons."""
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = None
    try:
        await server.add_protobuf_handler(ECHO, _echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
        requests: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        replies = await client.iterate_protobuf_handler(
            server.peer_id, ECHO, messages.queued(requests), runtime_pb2.ExpertResponse
        )
        seconds = []
        for _ in range(WARM_UP_ROUND_TRIPS + round_trips):
            began = time.perf_counter()
            requests.put_nowait(messages.request([payload]))
            messages.tensors_of(await anext(replies))
            seconds.append(time.perf_counter() - began)
        requests.put_nowait(None)
        async for _ in replies:  # the stream's end
            pass
        return statistics.median(seconds[WARM_UP_ROUND_TRIPS:])
    finally:
        if client is not None:
            await client.shutdown()
        await server.shutdown()
