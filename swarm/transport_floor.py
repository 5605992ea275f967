"""The transport's floor: a hidden state's round trip through two hivemind P2P daemons on this machine, with nothing
of blockswarm's on either side.

`swarm bench` sets the swarm's overhead over the local model against it: every message of a session passes from
Python to one `p2pd`, to the other, and to Python again, and no peer can answer faster than that. Both endpoints
live in this process (each with its own daemon, as every peer has), one echoing what the other sends on one
long-lived stream, as an inference session's steps travel, in the same framing (`swarm.message_stream`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from swarm import messages
from swarm.message_stream import MessageStream, serve_message_streams

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
        await serve_message_streams(server, ECHO, _echo, runtime_pb2.ExpertRequest)
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
        stream = await MessageStream.open(client, server.peer_id, ECHO)
        seconds = []
        for _ in range(WARM_UP_ROUND_TRIPS + round_trips):
            began = time.perf_counter()
            stream.send(messages.request([payload]))
            reply = await stream.receive(runtime_pb2.ExpertResponse)
            if reply is None:
                raise ConnectionError("the echoing endpoint ended the stream")
            messages.tensors_of(reply)
            seconds.append(time.perf_counter() - began)
        stream.end()
        while await stream.receive(runtime_pb2.ExpertResponse) is not None:  # the stream's end
            pass
        stream.close()
        return statistics.median(seconds[WARM_UP_ROUND_TRIPS:])
    finally:
        if client is not None:
            await client.shutdown()
        await server.shutdown()
