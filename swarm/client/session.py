"""An inference session: hidden states stream through a route, each peer keeping the session's KV cache."""

from __future__ import annotations

import logging

import torch

from swarm.client.routing import Route
from swarm.client.swarm_client import SwarmClient
from swarm.client.transport import InferenceStream
from swarm.errors import ConfigError
from swarm.protocol import InferenceOpen

logger = logging.getLogger(__name__)


class InferenceSession:
    """Steps of one conversation through blocks [0, num_blocks); `position` counts the tokens sent so far."""

    def __init__(self, swarm: SwarmClient, max_length: int):
        if max_length <= 0:
            raise ConfigError("max_length must be positive")
        self.swarm = swarm
        self.max_length = max_length
        self.position = 0
        self.route: Route | None = None
        self._streams: list[InferenceStream] = []

    async def step(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Run [batch, seq, hidden] states that start at `position` through all blocks."""
        batch, seq = hidden_states.shape[:2]
        if self.position + seq > self.max_length:
            raise ConfigError(
                f"the session would reach {self.position + seq} tokens, more than its max_length={self.max_length}; "
                "open it with a larger max_length"
            )
        if not self._streams:
            await self._open(batch)
        timeout = self.swarm.config.request_timeout
        for stream in self._streams:
            hidden_states = await stream.step(hidden_states, self.position, timeout)
        self.position += seq
        return hidden_states

    async def close(self) -> None:
        for stream in self._streams:
            await stream.close()
        self._streams = []

    async def _open(self, batch_size: int) -> None:
        route = await self.swarm.make_route(0, self.swarm.num_blocks, min_cache_tokens=self.max_length * batch_size)
        p2p = await self.swarm.p2p()
        self.route = route
        self._streams = [
            InferenceStream(p2p, span.peer_id, InferenceOpen(span.start, span.end, self.max_length, batch_size))
            for span in route.spans
        ]
