"""Stateless forward and backward through the swarm's blocks, as a differentiable torch operation.

The forward pass sends hidden states along a route and keeps each span's input; the backward pass sends the
gradients back span by span, and each peer recomputes its forward to return input gradients. A failed peer is
banned and its blocks are run by others (stateless calls need no replay), up to `max_retries` times per span.
"""

from __future__ import annotations

from typing import Any

import torch

from swarm.client._sync import run_sync
from swarm.client.routing import RouteSpan
from swarm.client.swarm_client import SwarmClient
from swarm.client.transport import call_backward, call_forward
from swarm.errors import RETRYABLE_ERRORS, SwarmError
from swarm.protocol import SpanRequest


async def forward_through(
    swarm: SwarmClient, hidden_states: torch.Tensor, start: int, end: int
) -> tuple[list[RouteSpan], list[torch.Tensor]]:
    """Run blocks [start, end); returns the spans used and the input of each span followed by the final output."""
    spans: list[RouteSpan] = []
    states = [hidden_states]
    position, failures = start, 0
    while position < end:
        route = await swarm.make_route(position, end)
        for span in route.spans:
            try:
                outputs = await call_forward(
                    await swarm.p2p(), span.peer_id, SpanRequest(span.start, span.end), states[-1],
                    swarm.config.request_timeout,
                )  # fmt: skip
            except RETRYABLE_ERRORS as e:
                failures = _count_failure(swarm, span, e, failures)
                break  # route the rest again from this span's start
            swarm.record_success(span.peer_id)
            spans.append(span)
            states.append(outputs)
            position = span.end
    return spans, states


async def backward_through(
    swarm: SwarmClient, spans: list[RouteSpan], span_inputs: list[torch.Tensor], grad_outputs: torch.Tensor
) -> torch.Tensor:
    for span, inputs in zip(reversed(spans), reversed(span_inputs), strict=True):
        grad_outputs = await _backward_span(swarm, span, inputs, grad_outputs)
    return grad_outputs


async def _backward_span(
    swarm: SwarmClient, span: RouteSpan, inputs: torch.Tensor, grad_outputs: torch.Tensor
) -> torch.Tensor:
    """Input gradients of blocks [span.start, span.end), from the same peer or, if it fails, from others."""
    failures = 0
    while True:
        try:
            grad_inputs = await call_backward(
                await swarm.p2p(), span.peer_id, SpanRequest(span.start, span.end), inputs, grad_outputs,
                swarm.config.request_timeout,
            )  # fmt: skip
            swarm.record_success(span.peer_id)
            return grad_inputs
        except RETRYABLE_ERRORS as e:
            failures = _count_failure(swarm, span, e, failures)
        replacement, states = await forward_through(swarm, inputs, span.start, span.end)
        if len(replacement) == 1:
            span = replacement[0]  # one peer covers it: retry the backward call there
            continue
        return await backward_through(swarm, replacement, states[:-1], grad_outputs)


def _count_failure(swarm: SwarmClient, span: RouteSpan, error: SwarmError, failures: int) -> int:
    swarm.ban(getattr(error, "peer_id", None) or span.peer_id, str(error))
    if failures + 1 > swarm.config.max_retries:
        raise SwarmError(
            f"blocks {span.start}:{span.end} failed on {failures + 1} peers in a row; last error: {error}"
        ) from error
    return failures + 1


class RemoteBlocks(torch.autograd.Function):
    """y = blocks(x) computed by the swarm; dy/dx flows back through the peers."""

    @staticmethod
    def forward(ctx: Any, hidden_states: torch.Tensor, swarm: SwarmClient) -> torch.Tensor:
        spans, states = run_sync(forward_through(swarm, hidden_states.detach().cpu(), 0, swarm.num_blocks))
        ctx.swarm, ctx.spans, ctx.span_inputs = swarm, spans, states[:-1]
        ctx.dtype, ctx.device = hidden_states.dtype, hidden_states.device
        return states[-1].to(dtype=hidden_states.dtype, device=hidden_states.device)

    @staticmethod
    def backward(ctx: Any, grad_outputs: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_inputs = run_sync(backward_through(ctx.swarm, ctx.spans, ctx.span_inputs, grad_outputs.cpu()))
        return grad_inputs.to(dtype=ctx.dtype, device=ctx.device), None
