"""Stateless forward and backward through the swarm's blocks, as a differentiable torch operation.

The forward pass sends hidden states along a route and keeps each span's input; the backward pass sends the
gradients back span by span, and each peer recomputes its forward to return input gradients. A failed peer is
banned and its blocks are run by others (stateless calls need no replay), up to `max_retries` times per span.
A batch larger than `ClientConfig.max_sub_batch_size` is split into parts that travel in parallel, each on its
own route with load spread over replicas.

A random share `verify_rate` of the calls is spot-checked by independent peers (verification.py); a peer they
outvote is banned like a failed one and its span computed elsewhere.

With `ModelAdapters`, every request carries the LoRA tensors and deep prompts of its span's blocks; peers apply
them for that request only and return their gradients with the input gradients, so they train like local modules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from swarm.client._sync import run_sync
from swarm.client.routing import RouteSpan
from swarm.client.swarm_client import SwarmClient
from swarm.client.transport import SpanAdapters, call_backward, call_forward
from swarm.client.verification import Outcome, Verdict, check_span
from swarm.compression import in_compute_dtype
from swarm.errors import RETRYABLE_ERRORS, PeerFaulty, SwarmError
from swarm.protocol import LoraHeader, SpanRequest


@dataclass(frozen=True)
class ModelAdapters:
    """The client's additions to every block of the model, as they travel: a LoRA adapter (`lora_tensors`
    block-major, swarm/models/lora.py) and/or deep prompts [num_blocks, pre_seq_len, hidden]."""

    lora_header: LoraHeader | None
    lora_tensors: tuple[torch.Tensor, ...]
    prompts: torch.Tensor | None

    @classmethod
    def detached(
        cls, lora_header: LoraHeader | None, lora_tensors: Sequence[torch.Tensor], prompts: torch.Tensor | None
    ) -> ModelAdapters | None:
        """What travels for these adapter tensors (copies on the CPU, out of autograd); None when there are none."""
        if lora_header is None and prompts is None:
            return None
        return cls(
            lora_header,
            tuple(t.detach().cpu() for t in lora_tensors),
            None if prompts is None else prompts.detach().cpu(),
        )

    @property
    def lora_per_block(self) -> int:
        return 0 if self.lora_header is None else 2 * len(self.lora_header.targets)

    def for_span(self, start: int, end: int) -> SpanAdapters:
        lora = None
        if self.lora_header is not None:
            k = self.lora_per_block
            lora = (self.lora_header, list(self.lora_tensors[start * k : end * k]))
        return SpanAdapters(lora, None if self.prompts is None else self.prompts[start:end])


@dataclass
class AdapterGrads:
    """Gradients of `ModelAdapters`' tensors, filled span by span during the backward pass."""

    lora: list[torch.Tensor | None]
    prompts: torch.Tensor | None

    def store(self, adapters: ModelAdapters, start: int, end: int, grads: list[torch.Tensor]) -> None:
        """Keep the grads a peer returned for blocks [start, end), in `SpanAdapters.tensors()` order."""
        if adapters.prompts is not None:
            *grads, prompt_grads = grads
            if self.prompts is None:
                self.prompts = torch.zeros_like(adapters.prompts)
            self.prompts[start:end] = prompt_grads
        first = start * adapters.lora_per_block
        self.lora[first : first + len(grads)] = grads


async def forward_through(
    swarm: SwarmClient,
    hidden_states: torch.Tensor,
    start: int,
    end: int,
    adapters: ModelAdapters | None = None,
    exclude: Collection[str] = (),
    check: bool = True,
) -> tuple[list[RouteSpan], list[torch.Tensor]]:
    """Run blocks [start, end), avoiding peers `exclude`; returns the spans used and the input of each span
    followed by the final output. With `check`, spans are spot-checked at the client's `verify_rate`."""
    spans: list[RouteSpan] = []
    states = [hidden_states]
    position, failures = start, 0
    while position < end:
        # training: share replicas by throughput
        route = await swarm.make_route(position, end, exclude=exclude, wait=not exclude, spread_load=True)
        for span in route.spans:
            try:
                outputs = await call_forward(
                    await swarm.p2p(), span.peer_id, _span_request(swarm, span),
                    in_compute_dtype(states[-1], span.dtype), swarm.config.request_timeout,
                    _span_adapters(adapters, span),
                )  # fmt: skip
                if check and swarm.spot_checks.due():
                    await check_forward(swarm, span, states[-1], outputs, adapters)
            except RETRYABLE_ERRORS as e:
                failures = _count_failure(swarm, span, e, failures)
                break  # route the rest again from this span's start
            swarm.record_success(span.peer_id)
            spans.append(span)
            states.append(outputs)
            position = span.end
    return spans, states


async def backward_through(
    swarm: SwarmClient,
    spans: list[RouteSpan],
    span_inputs: list[torch.Tensor],
    grad_outputs: torch.Tensor,
    adapters: ModelAdapters | None = None,
    adapter_grads: AdapterGrads | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Input gradients of the spans' blocks; with `adapters`, their gradients are stored in `adapter_grads`.
    With `check`, spans are spot-checked at the client's `verify_rate`."""
    for span, inputs in zip(reversed(spans), reversed(span_inputs), strict=True):
        grad_outputs = await _backward_span(swarm, span, inputs, grad_outputs, adapters, adapter_grads, check)
    return grad_outputs


async def _backward_span(
    swarm: SwarmClient,
    span: RouteSpan,
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    adapters: ModelAdapters | None,
    adapter_grads: AdapterGrads | None,
    check: bool,
) -> torch.Tensor:
    """Input gradients of blocks [span.start, span.end), from the same peer or, if it fails, from others."""
    failures = 0
    while True:
        try:
            grad_inputs, *grads = await call_backward(
                await swarm.p2p(), span.peer_id, _span_request(swarm, span), in_compute_dtype(inputs, span.dtype),
                in_compute_dtype(grad_outputs, span.dtype),
                swarm.config.request_timeout, _span_adapters(adapters, span),
            )  # fmt: skip
            if check and swarm.spot_checks.due():
                await _check_backward(swarm, span, inputs, grad_outputs, grad_inputs, adapters)
            swarm.record_success(span.peer_id)
            if adapters is not None and adapter_grads is not None:
                adapter_grads.store(adapters, span.start, span.end, grads)
            return grad_inputs
        except RETRYABLE_ERRORS as e:
            failures = _count_failure(swarm, span, e, failures)
        replacement, states = await forward_through(swarm, inputs, span.start, span.end, adapters, check=check)
        if len(replacement) == 1:
            span = replacement[0]  # one peer covers it: retry the backward call there
            continue
        return await backward_through(swarm, replacement, states[:-1], grad_outputs, adapters, adapter_grads, check)


def _span_request(swarm: SwarmClient, span: RouteSpan) -> SpanRequest:
    return SpanRequest(span.start, span.end, swarm.config.wire_compression)


async def check_forward(
    swarm: SwarmClient, span: RouteSpan, inputs: torch.Tensor, outputs: torch.Tensor, adapters: ModelAdapters | None
) -> None:
    """Spot-check what `span.peer_id` returned for the last `outputs.shape[1]` positions of `inputs` (all of them
    for a forward call; one step of an inference session, whose `inputs` are everything the span has seen), by
    recomputing the span statelessly elsewhere (verification.py); raises `PeerFaulty` if the peer is outvoted."""
    seq = outputs.shape[1]

    async def recompute(exclude: Collection[str]) -> tuple[torch.Tensor, list[str]]:
        spans, states = await forward_through(swarm, inputs, span.start, span.end, adapters, exclude, check=False)
        return states[-1][:, -seq:], [used.peer_id for used in spans]

    _raise_if_faulty(span, await check_span(swarm, span, outputs, recompute))


async def _check_backward(
    swarm: SwarmClient,
    span: RouteSpan,
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    grad_inputs: torch.Tensor,
    adapters: ModelAdapters | None,
) -> None:
    """Spot-check one backward call by its input gradients; raises `PeerFaulty` if its peer is outvoted."""

    async def recompute(exclude: Collection[str]) -> tuple[torch.Tensor, list[str]]:
        spans, states = await forward_through(swarm, inputs, span.start, span.end, adapters, exclude, check=False)
        grads = await backward_through(swarm, spans, states[:-1], grad_outputs, adapters, None, check=False)
        return grads, [used.peer_id for used in spans]

    _raise_if_faulty(span, await check_span(swarm, span, grad_inputs, recompute))


def _raise_if_faulty(span: RouteSpan, verdict: Verdict) -> None:
    if verdict.outcome is Outcome.PEER_FAULTY:
        raise PeerFaulty(span.peer_id, f"wrong outputs: {verdict.detail}")


def _span_adapters(adapters: ModelAdapters | None, span: RouteSpan) -> SpanAdapters | None:
    return None if adapters is None else adapters.for_span(span.start, span.end)


def _count_failure(swarm: SwarmClient, span: RouteSpan, error: SwarmError, failures: int) -> int:
    swarm.ban(getattr(error, "peer_id", None) or span.peer_id, str(error))
    if failures + 1 > swarm.config.max_retries:
        raise SwarmError(
            f"blocks {span.start}:{span.end} failed on {failures + 1} peers in a row; last error: {error}"
        ) from error
    return failures + 1


class RemoteBlocks(torch.autograd.Function):
    """y = blocks(x) computed by the swarm; dy/dx (and dy/d of each adapter tensor) flows back through the peers.

    `RemoteBlocks.apply(hidden_states, swarm)`, or with the client's additions to the blocks as autograd inputs
    of their own: `RemoteBlocks.apply(hidden_states, swarm, deep_prompts, lora_header, *lora_tensors)`, where
    `deep_prompts` is [num_blocks, pre_seq_len, hidden] or None and `lora_header` None when there is no LoRA.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden_states: torch.Tensor,
        swarm: SwarmClient,
        prompts: torch.Tensor | None = None,
        lora_header: LoraHeader | None = None,
        *lora_tensors: Any,
    ) -> torch.Tensor:
        adapters = ModelAdapters.detached(lora_header, lora_tensors, prompts)
        parts = hidden_states.detach().cpu().split(swarm.config.max_sub_batch_size)
        results = run_sync(_forward_parts(swarm, parts, adapters))
        ctx.swarm, ctx.adapters = swarm, adapters
        ctx.parts = [(spans, states[:-1]) for spans, states in results]
        ctx.dtype, ctx.device = hidden_states.dtype, hidden_states.device
        ctx.places = [(t.dtype, t.device) for t in lora_tensors]
        ctx.prompt_place = None if prompts is None else (prompts.dtype, prompts.device)
        outputs = torch.cat([states[-1] for _, states in results])
        return outputs.to(dtype=hidden_states.dtype, device=hidden_states.device)

    @staticmethod
    def backward(ctx: Any, grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_parts = grad_outputs.cpu().split(ctx.swarm.config.max_sub_batch_size)
        part_grads = [AdapterGrads(lora=[None] * len(ctx.places), prompts=None) for _ in ctx.parts]
        grad_inputs = run_sync(_backward_parts(ctx.swarm, ctx.parts, grad_parts, ctx.adapters, part_grads))
        lora_grads = [
            _sum_to([grads.lora[index] for grads in part_grads], dtype, device)
            for index, (dtype, device) in enumerate(ctx.places)
        ]
        prompt_grads = None
        if ctx.prompt_place is not None:
            prompt_grads = _sum_to([grads.prompts for grads in part_grads], *ctx.prompt_place)
        grad_inputs = torch.cat(grad_inputs).to(dtype=ctx.dtype, device=ctx.device)
        return grad_inputs, None, prompt_grads, None, *lora_grads


async def _forward_parts(
    swarm: SwarmClient, parts: tuple[torch.Tensor, ...], adapters: ModelAdapters | None
) -> list[tuple[list[RouteSpan], list[torch.Tensor]]]:
    """Each part of a split batch through all blocks, in parallel, spread over replicas by throughput (training
    calls from many trainers share the swarm's compute; see `routing`)."""
    return list(await asyncio.gather(*(forward_through(swarm, part, 0, swarm.num_blocks, adapters) for part in parts)))


async def _backward_parts(
    swarm: SwarmClient,
    parts: list[tuple[list[RouteSpan], list[torch.Tensor]]],
    grad_parts: tuple[torch.Tensor, ...],
    adapters: ModelAdapters | None,
    part_grads: list[AdapterGrads],
) -> list[torch.Tensor]:
    return list(
        await asyncio.gather(
            *(
                backward_through(swarm, spans, span_inputs, grad, adapters, grads)
                for (spans, span_inputs), grad, grads in zip(parts, grad_parts, part_grads, strict=True)
            )
        )
    )


def _sum_to(grads: list[torch.Tensor | None], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The sum of the parts' gradients of one tensor (None if no part reached it)."""
    present = [grad for grad in grads if grad is not None]
    return None if not present else torch.stack(present).sum(0).to(dtype=dtype, device=device)
