"""Stateless forward and backward through the swarm's blocks, as a differentiable torch operation.

The forward pass sends hidden states along a route and keeps each span's input; the backward pass sends the
gradients back along the same route, and each peer recomputes its forward to return input gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from swarm.client._sync import run_sync
from swarm.client.routing import Route
from swarm.client.swarm_client import SwarmClient
from swarm.client.transport import call_backward, call_forward
from swarm.protocol import SpanRequest


async def forward_through(swarm: SwarmClient, hidden_states: torch.Tensor) -> tuple[Route, list[torch.Tensor]]:
    """Run hidden states through all blocks; returns the route and the input of each span plus the final output."""
    route = await swarm.make_route(0, swarm.num_blocks)
    p2p = await swarm.p2p()
    states = [hidden_states]
    for span in route.spans:
        request = SpanRequest(span.start, span.end)
        states.append(await call_forward(p2p, span.peer_id, request, states[-1], swarm.config.request_timeout))
    return route, states


async def backward_through(
    swarm: SwarmClient, route: Route, span_inputs: list[torch.Tensor], grad_outputs: torch.Tensor
) -> torch.Tensor:
    p2p = await swarm.p2p()
    for span, inputs in zip(reversed(route.spans), reversed(span_inputs), strict=True):
        request = SpanRequest(span.start, span.end)
        grad_outputs = await call_backward(
            p2p, span.peer_id, request, inputs, grad_outputs, swarm.config.request_timeout
        )
    return grad_outputs


class RemoteBlocks(torch.autograd.Function):
    """y = blocks(x) computed by the swarm; dy/dx flows back through the peers."""

    @staticmethod
    def forward(ctx: Any, hidden_states: torch.Tensor, swarm: SwarmClient) -> torch.Tensor:
        route, states = run_sync(forward_through(swarm, hidden_states.detach().cpu()))
        ctx.swarm, ctx.route, ctx.span_inputs = swarm, route, states[:-1]
        ctx.dtype, ctx.device = hidden_states.dtype, hidden_states.device
        return states[-1].to(dtype=hidden_states.dtype, device=hidden_states.device)

    @staticmethod
    def backward(ctx: Any, grad_outputs: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_inputs = run_sync(backward_through(ctx.swarm, ctx.route, ctx.span_inputs, grad_outputs.cpu()))
        return grad_inputs.to(dtype=ctx.dtype, device=ctx.device), None
