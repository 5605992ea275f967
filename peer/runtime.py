"""Runs the hosted blocks on the device, off the event loop.

Decode steps of different sessions that wait for the device at the same time run as one batch over their own
KV caches (`BlockSlice.decode_together`): under load each forward pass serves many sessions. Decode steps also
wait for each other, up to `decode_gather_s` and never longer than the last batch took, while fewer than half of
the sessions decoding through the same blocks (those that sent a step within ACTIVE_DECODER_S) have one waiting:
one batch then answers them together, so their next steps come back together too. Not all of them: in a route
of several peers, the sessions whose steps are on another peer come back only after it, and waiting for them
would leave this peer idle. One or two sessions never wait. A long prompt step runs in parts of
`prefill_chunk_tokens`, and decode steps that arrive meanwhile run between its parts: one user's long prompt
delays the others by one part, not by the whole prompt.

Torch work runs one job at a time (`BlockRuntime._device`), in one executor thread: the event loop keeps serving
streams while a step computes, and steps of different sessions never race on the device. A caller's LoRA adapter
and deep prompts are hooked onto the blocks for its request, or for each step of its inference session, only
(swarm/models/lora.py, deep_prompts.py), which running one job at a time makes safe. One exception: a decode
batch runs on the event loop itself when the device is free, its steps are all of one span, and the last batch
took less than INLINE_DECODE_MAX_S. It saves two hand-offs between threads and computes faster on the thread that
just took the messages. The loop is held no longer than such a batch, and a batch's answers do not wait for the
next one: nothing can join the queue while the loop computes, so each batch ends its run of `_decode_waiting`, and
the next starts from a step that arrives later, behind those answers in the loop's queue. Measured through 2
peers of a 58M model on 2 CPU cores, in pairs of runs taken in turns: one session's token took 0.4 to 2.1 ms less
through the blocks (of 11 to 15 ms; 5 pairs); 8 sessions decoded 124.7 to 129.4 tokens/s against 114.8 to 117.6
in 4 pairs out of 5, the other 118.9 against 122.1. A step of a session that decodes here alone (after its first:
other sessions' first steps may come in the same turn of the loop), with no batch waiting or running, skips the
queue too: it runs at once on the loop, in the task that took its message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
from transformers import DynamicCache

from swarm.models import BlockSlice
from swarm.models.deep_prompts import applied_prompts
from swarm.models.lora import applied_lora
from swarm.protocol import LoraHeader

_R = TypeVar("_R")

ACTIVE_DECODER_S = 1.0  # a session that sent a decode step this recently is expected to send the next one soon
INLINE_DECODE_MAX_S = 0.05  # after a decode batch that took longer, the next runs in the executor thread


@dataclass(frozen=True)
class RequestAdapters:
    """A caller's additions to the span for one stateless request, already checked by the handler."""

    lora: tuple[LoraHeader, list[torch.Tensor]] | None = None
    prompts: torch.Tensor | None = None  # deep-ptune: [blocks of the span, pre_seq_len, hidden]

    def tensors(self) -> list[torch.Tensor]:
        tensors = [] if self.lora is None else list(self.lora[1])
        return tensors if self.prompts is None else [*tensors, self.prompts]

    def on(self, device: torch.device, dtype: torch.dtype, *, requires_grad: bool = False) -> RequestAdapters:
        def moved(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=device, dtype=dtype).requires_grad_(requires_grad)

        lora = None if self.lora is None else (self.lora[0], [moved(t) for t in self.lora[1]])
        return RequestAdapters(lora, None if self.prompts is None else moved(self.prompts))


class BlockRuntime:
    """Forward, backward and cached inference steps over blocks [start, end) of the hosted slice."""

    def __init__(
        self,
        block_slice: BlockSlice,
        output_noise: float = 0.0,
        on_decode_batch: Callable[[int], None] = lambda sessions: None,
        prefill_chunk_tokens: int = 512,
        decode_gather_s: float = 0.0,
    ):
        self.block_slice = block_slice
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.decode_gather_s = decode_gather_s  # longest wait of decode steps for other sessions' (seconds)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-runtime")
        self._device = threading.Lock()  # held by the thread that runs a job: the executor's, or the loop's
        self._sub_slices: dict[tuple[int, int], BlockSlice] = {}
        # A faulty peer, for tests of the clients' spot checks only: Gaussian noise of this std on every output.
        self.output_noise = output_noise
        self._noise = torch.Generator().manual_seed(0)
        self._decodes: list[_PendingDecode] = []  # decode steps waiting for the executor, batched when it frees up
        self._decoding: asyncio.Task[None] | None = None
        # each decoding session's cache -> (when it last sent a decode step, id of its span); gone with the session
        self._decoders: weakref.WeakKeyDictionary[DynamicCache, tuple[float, int]] = weakref.WeakKeyDictionary()
        self._decode_arrived = asyncio.Event()
        self.last_decode_batch_s = 0.0  # seconds of the last decode batch: steps never wait longer to gather
        self.on_decode_batch = on_decode_batch  # told how many sessions each decode forward pass served

    @property
    def start(self) -> int:
        return self.block_slice.start

    @property
    def end(self) -> int:
        return self.block_slice.end

    def span(self, start: int, end: int) -> BlockSlice:
        key = (start, end)
        if key not in self._sub_slices:
            self._sub_slices[key] = self.block_slice.sub_slice(start, end)
        return self._sub_slices[key]

    async def inference_step(
        self,
        span: BlockSlice,
        cache: DynamicCache,
        hidden_states: torch.Tensor,
        position: int,
        adapters: RequestAdapters | None = None,
    ) -> torch.Tensor:
        """The blocks' output for states that start at `position`, with the session's adapters (already on the
        span's device and dtype) applied. Decode steps of different sessions that wait for the device together
        run as one batch (`_decode_waiting`)."""
        if adapters is None and hidden_states.shape[1] == 1 and span.can_decode_together(cache):
            return self._faulty(await self._decode(span, cache, hidden_states))
        self._decoders.pop(cache, None)  # not batched (any more): nobody waits for its steps
        parts = []
        for offset in range(0, hidden_states.shape[1], self.prefill_chunk_tokens):
            part = hidden_states[:, offset : offset + self.prefill_chunk_tokens]
            parts.append(await self._run(_inference_step, span, cache, part, position + offset, adapters))
        return self._faulty(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    async def forward(
        self, span: BlockSlice, hidden_states: torch.Tensor, adapters: RequestAdapters | None = None
    ) -> torch.Tensor:
        return self._faulty(await self._run(_forward, span, hidden_states, adapters))

    async def backward(
        self,
        span: BlockSlice,
        hidden_states: torch.Tensor,
        grad_outputs: torch.Tensor,
        adapters: RequestAdapters | None = None,
    ) -> list[torch.Tensor]:
        """[grad w.r.t. hidden_states, *grads w.r.t. `adapters.tensors()`]."""
        return await self._run(_backward, span, hidden_states, grad_outputs, adapters)

    async def _decode(self, span: BlockSlice, cache: DynamicCache, hidden_states: torch.Tensor) -> torch.Tensor:
        known = cache in self._decoders  # a first step may have company arriving in this same turn of the loop
        self._decoders[cache] = (time.monotonic(), id(span))
        if known and self._alone() and self._runs_inline():  # nothing to batch with: the step runs now, in this task
            began = time.monotonic()
            (output,) = self._decode_on_loop(span, [(hidden_states, cache)])
            self.last_decode_batch_s = time.monotonic() - began
            self.on_decode_batch(1)
            return output
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._decodes.append(_PendingDecode(span, cache, hidden_states, future))
        self._decode_arrived.set()
        if self._decoding is None or self._decoding.done():
            self._decoding = asyncio.create_task(self._decode_waiting())
        return await future

    async def _decode_waiting(self) -> None:
        """Run the waiting decode steps, those of one span as one batch, until none is left. Steps that arrive
        while a batch computes wait for the next one: under load, batches grow by themselves."""
        if len(self._decoders) > 1:  # steps of other sessions that arrived in this same turn of the loop join
            await asyncio.sleep(0)  # the first batch; a lone session has no one to wait for
        while self._decodes:
            await self._gather_decodes()
            waiting, self._decodes = self._decodes, []
            by_span: dict[int, list[_PendingDecode]] = {}
            for pending in waiting:
                by_span.setdefault(id(pending.span), []).append(pending)
            for group in by_span.values():
                steps = [(pending.hidden, pending.cache) for pending in group]
                try:
                    began = time.monotonic()
                    if len(by_span) == 1 and self._runs_inline():  # on the loop: see the module doc
                        outputs = self._decode_on_loop(group[0].span, steps)
                    else:
                        outputs = await self._run(_decode_together, group[0].span, steps)
                    self.last_decode_batch_s = time.monotonic() - began
                except Exception as e:
                    for pending in group:
                        if not pending.future.done():
                            pending.future.set_exception(e)
                    continue
                self.on_decode_batch(len(group))
                for pending, output in zip(group, outputs, strict=True):
                    if not pending.future.done():  # its caller may have gone (the session's stream closed)
                        pending.future.set_result(output)

    async def _gather_decodes(self) -> None:
        """Wait, up to `decode_gather_s` or the last batch's duration if shorter (a longer wait would cost more
        than running the steps apart), until at least half of the sessions decoding through the spans of the
        waiting steps have a step waiting (see the module doc)."""
        deadline = time.monotonic() + min(self.decode_gather_s, self.last_decode_batch_s)
        while (left := deadline - time.monotonic()) > 0:
            spans = {id(pending.span) for pending in self._decodes}
            waiting = {id(pending.cache) for pending in self._decodes}
            recent = time.monotonic() - ACTIVE_DECODER_S
            coming = sum(
                at > recent and span in spans and id(cache) not in waiting
                for cache, (at, span) in list(self._decoders.items())
            )
            if coming <= len(waiting):
                return
            self._decode_arrived.clear()
            try:
                await asyncio.wait_for(self._decode_arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _alone(self) -> bool:
        """Whether one session alone decodes here, and no batch is waiting or running."""
        return len(self._decoders) == 1 and not self._decodes and (self._decoding is None or self._decoding.done())

    def _decode_on_loop(self, span: BlockSlice, steps: list[tuple[torch.Tensor, DynamicCache]]) -> list[torch.Tensor]:
        """`_decode_together` on the event loop's thread, which took the device (`_runs_inline`) for it."""
        try:
            return _decode_together(span, steps)
        finally:
            self._device.release()

    def _runs_inline(self) -> bool:
        """Whether the decode batch is to run on the event loop; if so, the device is taken for it. Only when the
        last batch was quick and no job holds the device: while the loop computes, no other job can start (jobs
        start from the loop)."""
        return self.last_decode_batch_s < INLINE_DECODE_MAX_S and self._device.acquire(blocking=False)

    def _faulty(self, outputs: torch.Tensor) -> torch.Tensor:
        if not self.output_noise:
            return outputs
        noise = torch.randn(outputs.shape, generator=self._noise) * self.output_noise
        return outputs + noise.to(outputs.dtype)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., _R], *args: object) -> _R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(holding, self._device, fn, *args))


def holding(device: threading.Lock, fn: Callable[..., _R], *args: object) -> _R:
    """`fn(*args)` once no other job holds the device."""
    with device:
        return fn(*args)


def _inference_step(
    span: BlockSlice,
    cache: DynamicCache,
    hidden_states: torch.Tensor,
    position: int,
    adapters: RequestAdapters | None,
) -> torch.Tensor:
    with torch.inference_mode():
        hidden_states = hidden_states.to(device=span.device, dtype=span.dtype)
        if adapters is None:
            return span(hidden_states, cache=cache, position=position).cpu()
        with _applied(span, adapters, position):
            return span(hidden_states, cache=cache, position=position).cpu()


@dataclass(frozen=True)
class _PendingDecode:
    span: BlockSlice
    cache: DynamicCache
    hidden: torch.Tensor  # [rows, 1, hidden]
    future: asyncio.Future[torch.Tensor]


def _decode_together(span: BlockSlice, steps: list[tuple[torch.Tensor, DynamicCache]]) -> list[torch.Tensor]:
    """Each step's output on the CPU, brought back from the device in one copy."""
    with torch.inference_mode():
        if len(steps) == 1:
            ((hidden, cache),) = steps
            hidden = hidden.to(device=span.device, dtype=span.dtype)
            return [span(hidden, cache=cache, position=cache.get_seq_length()).cpu()]
        return list(span.decode_together(steps).cpu().split([hidden.shape[0] for hidden, _ in steps]))


def _forward(span: BlockSlice, hidden_states: torch.Tensor, adapters: RequestAdapters | None) -> torch.Tensor:
    with torch.inference_mode():
        hidden_states = hidden_states.to(device=span.device, dtype=span.dtype)
        if adapters is None:
            return span(hidden_states).cpu()
        with _applied(span, adapters.on(span.device, span.dtype)):
            return span(hidden_states).cpu()


def _backward(
    span: BlockSlice, hidden_states: torch.Tensor, grad_outputs: torch.Tensor, adapters: RequestAdapters | None
) -> list[torch.Tensor]:
    """Recompute the forward pass with gradients on and return the gradients w.r.t. the input hidden states
    and, with adapters, w.r.t. each of their tensors (in `RequestAdapters.tensors()` order)."""
    with torch.enable_grad():
        inputs = hidden_states.to(device=span.device, dtype=span.dtype).requires_grad_(True)
        adapters = adapters.on(span.device, span.dtype, requires_grad=True) if adapters is not None else None
        with _applied(span, adapters) if adapters is not None else contextlib.nullcontext():
            outputs = span(inputs)
        extra = adapters.tensors() if adapters is not None else []
        grads = torch.autograd.grad(outputs, [inputs, *extra], grad_outputs.to(device=span.device, dtype=span.dtype))
    return [grad.cpu() for grad in grads]


@contextlib.contextmanager
def _applied(span: BlockSlice, adapters: RequestAdapters, position: int = 0) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if adapters.lora is not None:
            stack.enter_context(applied_lora(span.blocks, *adapters.lora))
        if adapters.prompts is not None:
            stack.enter_context(applied_prompts(span.blocks, adapters.prompts, position))
        yield
