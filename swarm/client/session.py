"""An inference session: hidden states stream through a route, each peer keeping the session's KV cache.

Fault tolerance lives here. For every span of the route the session keeps the hidden states it has sent (at
most `max_length` tokens). When a peer fails during a step (broken connection, error reply, timeout, refusal
because it is leaving or full), the session bans it, routes that span's blocks through other peers (possibly
several), replays the stored inputs so their caches hold everything the lost peer had seen, and sends the step
again. The caller sees a delay and a log line, and the same output.

A peer that answers wrongly is found by spot checks (verification.py): for a random share `verify_rate` of each
span's steps, an independent route recomputes the span over everything the session sent it; a peer outvoted by two
other sources is banned and replaced like a failed one, and the step is computed again.

A hung peer (stopped, not dead) is found by a per-step timeout that adapts to the span's recent decode steps:
`hung_step_factor` times the slowest of them, never below `min_step_timeout` nor above `request_timeout`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from dataclasses import dataclass, field

import torch

from swarm.client._sync import client_loop
from swarm.client.metrics import client_metrics
from swarm.client.remote_blocks import ModelAdapters, check_forward
from swarm.client.routing import Route, RouteSpan
from swarm.client.swarm_client import SwarmClient
from swarm.client.transport import InferenceStream, StepReply
from swarm.client.verification import CheckSchedule
from swarm.compression import in_compute_dtype
from swarm.config import check_wire_compression
from swarm.errors import (
    RETRYABLE_ERRORS,
    ConfigError,
    MissingBlocksError,
    PeerFaulty,
    PeerTimeout,
    RequestRejected,
    SwarmError,
)
from swarm.logs import short_id
from swarm.messages import as_received, tensor_digest
from swarm.protocol import ForwardTarget, InferenceOpen

logger = logging.getLogger(__name__)

RECENT_STEPS = 8  # decode-step durations remembered per span for the adaptive timeout
_FORWARDED_OTHER_STATES = "forwarded other hidden states to the next span than it answered"


class _OtherInputsForwarded(Exception):
    """The previous span's peer forwarded other hidden states to this span's peer than it answered the client."""

    def __init__(self, reply: StepReply):
        super().__init__("other hidden states forwarded than answered")
        self.reply = reply  # this span's reply to them


@dataclass
class _SpanConnection:
    """One span of the route: its stream, and every input sent through it (for replay on failure)."""

    span: RouteSpan
    stream: InferenceStream
    checks: CheckSchedule  # which of its steps an independent peer recomputes
    inputs: list[torch.Tensor] = field(default_factory=list)
    recent_step_seconds: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_STEPS)
    )


class InferenceSession:
    """Steps of one conversation through blocks [0, num_blocks); `position` counts the tokens sent so far."""

    def __init__(
        self,
        swarm: SwarmClient,
        max_length: int,
        adapters: ModelAdapters | None = None,
        *,
        prefill_chunk_tokens: int | None = None,
        wire_compression: str | None = None,
    ):
        if max_length <= 0:
            raise ConfigError("max_length must be positive")
        if wire_compression is not None:
            check_wire_compression(wire_compression)
        self.swarm = swarm
        self.max_length = max_length
        self.adapters = adapters  # LoRA / deep prompts every peer applies to this session's steps
        # a longer step flows down the route in chunks of this size (`_pipelined`); 0: sent whole, span by span
        chunk = swarm.config.prefill_chunk_tokens if prefill_chunk_tokens is None else prefill_chunk_tokens
        self.prefill_chunk_tokens = chunk
        # how hidden states travel to and from the peers (WIRE_COMPRESSIONS); the client's config by default
        self.wire_compression = swarm.config.wire_compression if wire_compression is None else wire_compression
        self.position = 0
        self.reroutes = 0  # how many failed spans were replaced so far
        self._batch_size: int | None = None
        self._connections: list[_SpanConnection] = []
        self._excluded: set[str] = set()  # peers that refused this session (full, leaving): not faulty, not banned
        self._metrics = client_metrics()
        self._last_output_time: float | None = None  # perf_counter() when the last step's output arrived
        # a route was built: the next step or the close re-reads a stale swarm view, once the caller has its token
        self._view_used = False
        self._opening: asyncio.Future[list[_SpanConnection]] | None = None  # the first route's streams, opening

    @property
    def route(self) -> Route | None:
        """The spans in use now (a reroute changes them)."""
        return Route(tuple(c.span for c in self._connections)) if self._connections else None

    async def step(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Run [batch, seq, hidden] states that start at `position` through all blocks."""
        began = time.perf_counter()
        if self._connections:  # not the first step, whose route is still new
            self._refresh_used_view()
        batch, seq = hidden_states.shape[:2]
        if self.position + seq > self.max_length:
            raise ConfigError(
                f"the session would reach {self.position + seq} tokens, more than its max_length={self.max_length}; "
                "open it with a larger max_length"
            )
        if self._batch_size is None:
            self._open(batch)
        elif batch != self._batch_size:
            raise ConfigError(f"the session was opened for batch size {self._batch_size}, this step has {batch}")
        if self._opening is not None:
            await self._opened()
        if not self._connections:
            raise ConfigError("this inference session is closed")
        chunk = self.prefill_chunk_tokens
        if chunk and seq > chunk and len(self._connections) > 1:
            try:
                outputs = await self._pipelined(hidden_states, chunk)
            except RETRYABLE_ERRORS as e:  # the failed span is replaced; the plain path below redoes the step
                logger.info("Pipelined prefill failed (%s); sending the prompt span by span", e)
            else:
                self.position += seq
                self._record_timing(began, seq)
                return outputs
        index = 0
        checked: dict[int, bool] = {}  # by id of a connection: whether this step of it is spot-checked
        sent_at: float | None = None  # the step was forwarded to this span; the client sent it to a span before then
        while index < len(self._connections):
            connection = self._connections[index]
            try:
                reply = None
                if sent_at is not None:
                    previous = self._connections[index - 1]
                    expected = self._digest_as_sent(connection, hidden_states)  # while the peer computes
                    reply = await self._receive_forwarded(connection, previous, hidden_states, sent_at)
                    if reply is not None and reply.input_digest != expected:
                        raise _OtherInputsForwarded(reply)
                if reply is None:  # not forwarded, or the push failed
                    sent_at = time.perf_counter()
                    reply = await self._send(
                        connection, hidden_states, self.position, self._forward_targets(index, seq, checked)
                    )
                if not reply.forwarded:
                    sent_at = None
                if self._checked(connection, checked):
                    await self._check(connection, hidden_states, reply.outputs)
            except _OtherInputsForwarded as e:
                index, hidden_states = await self._replace_forwarder(index, e.reply)
                sent_at = None
                continue  # the same step, from the previous span's replacement on
            except RETRYABLE_ERRORS as e:
                await self._replace(index, e)
                sent_at = None
                continue  # the same step, through the replacement
            connection.inputs.append(hidden_states)
            hidden_states = reply.outputs
            index += 1
        self.position += seq
        self._record_timing(began, seq)
        return hidden_states

    def open_soon(self, batch_size: int) -> None:
        """Start choosing the route and opening its streams now, in the background, for a first step of
        `batch_size` rows: for callers that know the batch before they have the first hidden states (`generate`,
        whose own set-up takes about as long as opening). Callable from any thread."""
        client_loop().call_soon_threadsafe(self._open, batch_size)

    def _open(self, batch_size: int) -> None:
        if self._batch_size is None:
            self._batch_size = batch_size
            self._opening = asyncio.ensure_future(self._connect(0, self.swarm.num_blocks, history=None))

    async def _opened(self) -> None:
        assert self._opening is not None
        opening, self._opening = self._opening, None
        try:
            self._connections = await opening
        except BaseException:
            self._batch_size = None  # not opened: a later step opens it afresh
            raise
        self._metrics.sessions.inc()

    def _record_timing(self, began: float, seq: int) -> None:
        now = time.perf_counter()
        if self._last_output_time is None:
            self._metrics.time_to_first_token.observe(now - began)
        elif seq == 1:  # a new prompt in a conversation is not an inter-token gap
            self._metrics.inter_token.observe(now - self._last_output_time)
        self._last_output_time = now

    async def _pipelined(self, hidden_states: torch.Tensor, chunk: int) -> torch.Tensor:
        """A long prompt cut into chunks of `chunk` tokens that flow down the route, so that every peer works at
        once: while the second span runs chunk 1, the first runs chunk 2. Each span's stream takes its chunks in
        order.

        If a span fails, the spans after it stop once they have answered what they were given (a stream must
        never be left with a request in flight), the failed span is replaced as in any step, and the caller sends
        the step again from `position`: nothing was recorded, and the peers that got further roll back."""
        chunks = hidden_states.split(chunk, dim=1)
        if self.swarm.config.forward_steps and all(c.stream.takes_forwarded_steps for c in self._connections[1:]):
            return await self._pipelined_forwarded(chunks)
        queues: list[asyncio.Queue[torch.Tensor | None]] = [asyncio.Queue() for _ in range(len(self._connections) + 1)]
        for part in chunks:
            queues[0].put_nowait(part)
        received: list[list[torch.Tensor]] = [[] for _ in self._connections]  # each span's input chunks

        async def run(index: int, connection: _SpanConnection) -> None:
            position = self.position
            try:
                for _ in chunks:
                    part = await queues[index].get()
                    if part is None:
                        return  # a span before this one failed
                    received[index].append(part)
                    queues[index + 1].put_nowait((await self._send(connection, part, position)).outputs)
                    position += part.shape[1]
            except BaseException:
                queues[index + 1].put_nowait(None)
                raise

        results = await asyncio.gather(
            *(run(i, connection) for i, connection in enumerate(self._connections)), return_exceptions=True
        )
        for index, result in enumerate(results):
            if isinstance(result, BaseException):
                if isinstance(result, RETRYABLE_ERRORS):
                    await self._replace(index, result)
                raise result
        for connection, parts in zip(self._connections, received, strict=True):
            connection.inputs.append(torch.cat(parts, dim=1))
        return torch.cat([queues[-1].get_nowait() for _ in chunks], dim=1)

    async def _pipelined_forwarded(self, chunks: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`_pipelined` with forwarding: the client sends every chunk to the first span at once, each to be
        forwarded down the whole route, and each peer runs the chunks as they come and sends them on, so that no
        chunk waits for the client between spans. The client reads every span's answers, checks each forwarded
        chunk against what the span before answered it, and sends a chunk on itself where a push failed (a peer
        runs a later chunk pushed to it early in its turn).

        A failed span, or one that forwarded other hidden states than it answered, leaves answers in flight on
        the route's streams that nobody expects: the whole route is replaced (the failed peer left out) and
        rebuilt from the session's history, and the caller sends the step again span by span."""
        connections = self._connections
        first_step = [c.stream.steps for c in connections]  # each stream's number for the first chunk
        starts = [self.position + sum(part.shape[1] for part in chunks[:k]) for k in range(len(chunks))]
        timeout = self.swarm.config.request_timeout

        def targets(index: int, k: int) -> tuple[ForwardTarget, ...]:
            following = enumerate(connections[index + 1 :], start=index + 1)
            return tuple(c.stream.forward_target(timeout / 2, c.span.dtype, first_step[j] + k) for j, c in following)

        # each span's input chunks, as the span before answered them, and whether they were forwarded to it
        queues: list[asyncio.Queue[tuple[torch.Tensor, bool]]] = [asyncio.Queue() for _ in connections]
        received: list[list[torch.Tensor]] = [[] for _ in connections]
        outputs: list[torch.Tensor] = []

        async def send_all() -> None:
            head = connections[0]
            for k, part in enumerate(chunks):
                await head.stream.send(in_compute_dtype(part, head.span.dtype), starts[k], timeout, targets(0, k))
                queues[0].put_nowait((part, False))

        async def run(index: int, connection: _SpanConnection) -> None:
            for k in range(len(chunks)):
                part, forwarded = await queues[index].get()
                shape = part.shape[:2]
                if index == 0:
                    reply = await connection.stream.reply(shape, timeout)
                else:
                    reply = None
                    if forwarded:
                        previous = connections[index - 1]
                        reply = await self._forwarded_reply(connection, previous, first_step[index - 1] + k, shape)
                        if reply is not None and reply.input_digest != self._digest_as_sent(connection, part):
                            raise PeerFaulty(previous.span.peer_id, _FORWARDED_OTHER_STATES)
                    if reply is None:  # not forwarded, or the push failed
                        reply = await self._send(connection, part, starts[k], targets(index, k))
                received[index].append(part)
                if index + 1 < len(connections):
                    queues[index + 1].put_nowait((reply.outputs, reply.forwarded))
                else:
                    outputs.append(reply.outputs)

        tasks = [asyncio.ensure_future(send_all())]
        tasks += [asyncio.ensure_future(run(i, c)) for i, c in enumerate(connections)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # the first failure stops the rest at once: the whole route is replaced anyway
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and (error := task.exception()) is not None:
                if isinstance(error, RETRYABLE_ERRORS):
                    await self._replace(0, error, end_index=len(connections))
                raise error
        for connection, parts in zip(connections, received, strict=True):
            connection.inputs.append(torch.cat(parts, dim=1))
        return torch.cat(outputs, dim=1)

    def rollback(self, position: int) -> None:
        """Forget every token from `position` on: the next step starts there, and each peer drops the rest of its
        cache when it sees that step (speculative decoding, an edited conversation)."""
        if not 0 <= position <= self.position:
            raise ConfigError(f"cannot roll back to position {position}: the session holds {self.position} tokens")
        for connection in self._connections:
            if connection.inputs:
                kept = torch.cat(connection.inputs, dim=1)[:, :position]
                connection.inputs = [kept] if position else []
        self.position = position

    def _refresh_used_view(self) -> None:
        """Re-read the swarm view in the background if a route was built from it and it is stale. It is done here,
        not while building the route: a re-read keeps every DHT node of the swarm busy for about 10 ms, which on a
        machine with few cores would delay the first token by as much."""
        if self._view_used:
            self._view_used = False
            self.swarm.refresh_view_if_stale()

    async def close(self) -> None:
        if self._opening is not None:  # opened by `open_soon`, never stepped: stop opening, close what opened
            opening, self._opening = self._opening, None
            opening.cancel()
            await asyncio.wait([opening])
            if not opening.cancelled() and opening.exception() is None:
                self._connections = opening.result()
        self._refresh_used_view()
        await asyncio.gather(*(connection.stream.close() for connection in self._connections))
        self._connections = []

    async def _send(
        self,
        connection: _SpanConnection,
        hidden_states: torch.Tensor,
        position: int,
        forward_to: tuple[ForwardTarget, ...] = (),
    ) -> StepReply:
        timeout = self._step_timeout(connection, hidden_states.shape[1])
        began = time.perf_counter()
        try:
            reply = await connection.stream.step(
                in_compute_dtype(hidden_states, connection.span.dtype), position, timeout, forward_to
            )
        except PeerTimeout as e:
            raise PeerTimeout(connection.span.peer_id, f"no answer to a step within {timeout:.1f} s") from e
        if hidden_states.shape[1] == 1:
            connection.recent_step_seconds.append(time.perf_counter() - began)
        return reply

    async def _replace_forwarder(self, index: int, reply: StepReply) -> tuple[int, torch.Tensor]:
        """The peer before span `index` forwarded other hidden states than it answered (`reply`: span `index`'s
        answer to them): it is faulty. Replace it, and give back where the step starts again: its replacement and
        the step's input there. Span `index`, and the spans it forwarded the step on to, whose answers are taken
        here, compute the step again when it comes back (the same position rolls their caches back)."""
        shape = reply.outputs.shape[:2]
        following = index
        while reply.forwarded and following + 1 < len(self._connections):
            following += 1
            connection, pusher = self._connections[following], self._connections[following - 1]
            try:
                forwarded = await self._forwarded_reply(connection, pusher, pusher.stream.steps - 1, shape)
            except RETRYABLE_ERRORS as e:
                await self._replace(following, e)
                break
            if forwarded is None:  # the push failed: nothing came
                break
            reply = forwarded
        previous = self._connections[index - 1]
        hidden_states = previous.inputs.pop()  # the step goes through its replacement again
        error = PeerFaulty(previous.span.peer_id, _FORWARDED_OTHER_STATES)
        await self._replace(index - 1, error)
        return index - 1, hidden_states

    def _digest_as_sent(self, connection: _SpanConnection, hidden_states: torch.Tensor) -> bytes:
        """The digest of `hidden_states` as the connection's peer would decode them had the client sent them."""
        sent = in_compute_dtype(hidden_states, connection.span.dtype)
        return tensor_digest(as_received(sent, connection.stream.session_open.compression))

    @staticmethod
    def _checked(connection: _SpanConnection, checked: dict[int, bool]) -> bool:
        """Whether this step of `connection` is spot-checked, drawn once per step."""
        if id(connection) not in checked:
            checked[id(connection)] = connection.checks.due()
        return checked[id(connection)]

    def _forward_targets(self, index: int, seq: int, checked: dict[int, bool]) -> tuple[ForwardTarget, ...]:
        """The spans after `index` that get this step of `seq` tokens from their previous span's peer: each next
        one while its session is open on its peer, up to one whose predecessor's output is spot-checked first (the
        next span must not run on an output before its check). A push may take half the client's timeout for the
        step: one that fails is then told in time for the client to send the step itself."""
        if not self.swarm.config.forward_steps:
            return ()
        targets = []
        for previous, following in zip(self._connections[index:-1], self._connections[index + 1 :], strict=True):
            if self._checked(previous, checked) or not following.stream.takes_forwarded_steps:
                break
            timeout = self._step_timeout(previous, seq) / 2
            targets.append(following.stream.forward_target(timeout, following.span.dtype))
        return tuple(targets)

    async def _receive_forwarded(
        self, connection: _SpanConnection, previous: _SpanConnection, hidden_states: torch.Tensor, sent_at: float
    ) -> StepReply | None:
        """The reply to a step that the previous span's peer forwarded to this span's peer, or None if that peer
        says its push failed (or its stream ended): the caller then sends the step itself. The step's duration
        counts from when the client sent it to an earlier span (longer than this span's own share: the hang
        timeout it feeds stays on the lenient side)."""
        reply = await self._forwarded_reply(connection, previous, previous.stream.steps - 1, hidden_states.shape[:2])
        if reply is not None and hidden_states.shape[1] == 1:
            connection.recent_step_seconds.append(time.perf_counter() - sent_at)
        return reply

    async def _forwarded_reply(
        self, connection: _SpanConnection, previous: _SpanConnection, pushed_step: int, shape: torch.Size
    ) -> StepReply | None:
        """The reply of `connection`'s peer to the step that `previous`'s peer pushed to it (its own step number
        `pushed_step`), or None once that peer says the push failed."""
        timeout = self._step_timeout(connection, shape[1])
        answer = connection.stream.next_answer()
        push_failure = previous.stream.push_failure(pushed_step)
        try:
            await asyncio.wait([answer, push_failure], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            push_failure.cancel()
            answer.cancel()  # unless it came: a read given up leaves the answer to the next one
        if answer.cancelled():
            if push_failure.cancelled():  # neither came
                raise PeerTimeout(connection.span.peer_id, f"no answer to a forwarded step within {timeout:.1f} s")
            return None
        reply = connection.stream.decoded(answer.result(), shape)
        connection.stream.steps += 1  # counted once it came: without it, the client sends the same step itself
        self._metrics.forwarded_steps.inc()
        return reply

    async def _check(self, connection: _SpanConnection, hidden_states: torch.Tensor, outputs: torch.Tensor) -> None:
        """Spot-check this step: an independent route recomputes the span over its whole input so far.
        Raises `PeerFaulty` when the peer is outvoted, so the step is recomputed on a replacement."""
        inputs = torch.cat([*connection.inputs, hidden_states], dim=1)
        await check_forward(self.swarm, connection.span, inputs, outputs, self.adapters)

    def _step_timeout(self, connection: _SpanConnection, seq: int) -> float:
        config = self.swarm.config
        if seq != 1 or not connection.recent_step_seconds:
            return config.request_timeout  # prefill or a first step: nothing to compare with
        adaptive = config.hung_step_factor * max(connection.recent_step_seconds)
        return min(max(adaptive, config.min_step_timeout), config.request_timeout)

    def _leave_out(self, peer_id: str, error: SwarmError) -> None:
        """A failed peer is banned for everyone; one that only refused this session is skipped by it alone."""
        if isinstance(error, RequestRejected):
            logger.info("Peer %s refused the session (%s); trying others", short_id(peer_id), error)
            self._excluded.add(peer_id)
        else:
            self.swarm.ban(peer_id, str(error))

    async def _replace(self, index: int, error: SwarmError, end_index: int | None = None) -> None:
        """Swap the failed connection at `index` for new ones over the same blocks, with their caches rebuilt.
        With `end_index`, the connections from `index` to `end_index` are swapped together: `error` names the
        failed one among them, and the others' streams can no longer be trusted to be in step."""
        failed = self._connections[index : index + 1 if end_index is None else end_index]
        del self._connections[index : index + len(failed)]
        peer_id = getattr(error, "peer_id", None) or failed[0].span.peer_id
        self._leave_out(peer_id, error)
        for connection in failed:
            await connection.stream.abort()
        history = torch.cat(failed[0].inputs, dim=1) if failed[0].inputs else None
        start, end = failed[0].span.start, failed[-1].span.end
        last_error: SwarmError = error
        for attempt in range(1, self.swarm.config.max_retries + 1):
            began = time.perf_counter()
            try:
                replacement = await self._connect(start, end, history)
            except MissingBlocksError:
                if isinstance(last_error, RequestRejected):
                    raise last_error from None  # every peer of these blocks is full or leaving: say so
                raise
            except RETRYABLE_ERRORS as e:
                if (failed_peer := getattr(e, "peer_id", None)) is not None:
                    self._leave_out(failed_peer, e)
                last_error = e
                continue
            self._connections[index:index] = replacement
            self.reroutes += 1
            self._metrics.reroutes.inc()
            logger.warning(
                "Rerouted blocks %d:%d away from %s (%s) after %d attempt(s), replayed %d tokens in %.2f s: %s",
                start, end, short_id(peer_id), type(error).__name__, attempt,
                0 if history is None else history.shape[1], time.perf_counter() - began,
                Route(tuple(c.span for c in replacement)).describe(),
            )  # fmt: skip
            return
        raise SwarmError(
            f"blocks {start}:{end} failed on {self.swarm.config.max_retries} replacement peers in a row; "
            f"last error: {last_error}"
        ) from last_error

    async def _connect(self, start: int, end: int, history: torch.Tensor | None) -> list[_SpanConnection]:
        """Streams over a fresh route for blocks [start, end); with `history`, replay it to rebuild their caches."""
        assert self._batch_size is not None
        route = await self.swarm.make_route(
            start,
            end,
            min_cache_tokens=self.max_length * self._batch_size,
            exclude=self._excluded,
            wait=not self._excluded,  # peers that are full or leaving will not come back within a step
            refresh_view=False,  # later: `_refresh_used_view`
        )
        self._view_used = True
        p2p = await self.swarm.p2p()
        connections = [
            _SpanConnection(
                span,
                checks=CheckSchedule(self.swarm.config.verify_rate),
                stream=InferenceStream(
                    p2p,
                    span.peer_id,
                    InferenceOpen(
                        span.start,
                        span.end,
                        self.max_length,
                        self._batch_size,
                        self.wire_compression,
                        session=secrets.token_hex(16) if self.swarm.config.forward_steps else "",
                    ),
                    None if self.adapters is None else self.adapters.for_span(span.start, span.end),
                ),
            )
            for span in route.spans
        ]
        try:
            # every span's stream opens now, side by side; one that fails to open fails its first step instead,
            # which routes around it
            await asyncio.gather(
                *(c.stream.open(self.swarm.config.request_timeout) for c in connections), return_exceptions=True
            )
            # sessions set up before their first step, which can then be forwarded to them too
            for connection in connections:
                if connection.stream.adapters is None:
                    connection.stream.open_ahead()
            if history is not None:
                hidden_states = history
                for connection in connections:
                    outputs = (await self._send(connection, hidden_states, 0)).outputs
                    connection.inputs.append(hidden_states)
                    hidden_states = outputs
        except BaseException:  # a failed replay, or cancelled (a session closed while opening): end what opened
            for connection in connections:
                await connection.stream.abort()
            raise
        for connection in connections:
            self.swarm.record_success(connection.span.peer_id)
        return connections
