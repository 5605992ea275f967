"""`swarm bench`: how fast a swarm serves a model, against the same model run locally in the same invocation.

    swarm bench [MODEL] [--peers 2] [--new-tokens 32] [--clients 8] [--repeats 3] [--json FILE]
    swarm bench MODEL --initial-peers MADDR ...        # an existing swarm instead of one started here

Without `--initial-peers` it starts a loopback swarm (a bootstrap node and `--peers` peers splitting the blocks
evenly), so the figures measure this implementation's overhead, not a network. It reports, as medians over
`--repeats` runs, the runs of the figures that a ratio compares taken in turns (one run of each per round: the
local, forwarded and unforwarded generations; the concurrent sessions and the single ones; the whole, pipelined and
unforwarded pipelined prefills), so that a machine whose speed drifts meanwhile moves both sides of a ratio:

  * decode tokens/s of greedy generation through the swarm and locally (`transformers` generate), and the ratio;
    where the swarm stores wide weights column-major (a CPU in float32, swarm/models/weight_layout.py), also
    locally with that layout, the swarm's own cost apart from the faster layout; and through the swarm with
    forwarding between peers off (`ClientConfig.forward_steps`);
  * time to first token (until the first new token reaches a streaming caller) through the swarm and locally,
    and the ratio;
  * aggregate decode tokens/s of `--clients` concurrent sessions, and its ratio to one session; and the same
    for sessions that skip the client's LM head (`headless_session`): on one machine the clients' heads share the
    cores with the peers, so this tells what the peers themselves serve; and how far the concurrent sessions
    shared passes, through the client's LM head and each loopback peer's decode forward passes;
  * speculative decoding with `--draft MODEL` (greedy; the local model itself when not given, its wide weights
    stored as the client stores its head's): tokens/s and the draft's acceptance rate;
  * the prefill of a `--long-prompt` prompt pipelined in chunks of `--prefill-chunk` tokens, against sent whole;
    and pipelined with forwarding between peers off;
  * for each wire compression (none, fp16, 8bit): decode tokens/s, the error of the prompt's logits against the
    local model's, and whether the greedy tokens stay equal;
  * for a loopback swarm, the transport's floor (swarm/transport_floor.py): a hidden state's round trip through
    two `p2pd` daemons with nothing of blockswarm's on either side, and what the decode ratio would be if the
    swarm's only cost over the local model were the messages of each token's path at that floor;
  * for a loopback swarm, where a decode token's time goes, locally and through the swarm (swarm/token_time.py):
    the decoder blocks (each peer's compute), the LM head and the rest, from one more greedy generation of each.

`--added-latency-ms` and `--peer-latency-ms` give the loopback peers a network's round trips, with the client
and between peers (the peers wait them out: each message of an inference session arrives half a round trip with
the client late, each way, and a pushed step half a round trip between peers late, each without holding up the
messages behind it). `--device cuda --dtype bfloat16` runs the local model, the client's own parts and the
loopback peers there.
Plain greedy tokens through the swarm must equal the local model's (else exit code 1); speculative and lossy-wire
tokens are compared and reported. The command says on stderr what it measures next, as it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from swarm.client._sync import run_sync
from swarm.client.remote_model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from swarm.client.session import InferenceSession
from swarm.client.speculative import speculative_generate
from swarm.config import ClientConfig
from swarm.demo import even_spans
from swarm.models import ModelSource, resolve_dtype
from swarm.models.weight_layout import store_wide_linears_column_major
from swarm.protocol import WIRE_COMPRESSIONS
from swarm.testing import LocalSwarm
from swarm.token_time import TokenTime, local_token_time, scraped_histogram, swarm_token_time
from swarm.transport_floor import raw_round_trip_seconds

DECODE_BATCH_SESSIONS = "blockswarm_decode_batch_sessions"  # a peer's histogram of sessions per decode pass
START_TIMEOUT_SECONDS = 180.0
PROMPT_TOKENS = 16
FLOOR_ROUND_TRIPS = 200


@dataclass(frozen=True, slots=True)
class BenchOptions:
    model: Path
    initial_peers: tuple[str, ...]  # empty: start a loopback swarm here
    peers: int
    new_tokens: int
    clients: int
    repeats: int
    num_threads: int  # torch threads of the local model, the client and each peer started here
    draft: Path | None  # speculative decoding's draft model; None: the local model itself
    draft_tokens: int
    long_prompt: int  # tokens of the prompt whose prefill is timed pipelined and whole
    prefill_chunk: int
    # loopback swarm only, a network: the round trip of an inference step between the client and a peer, and
    # between two peers (a step one forwards to the next)
    added_latency_ms: float = 0.0
    peer_latency_ms: float = 0.0
    device: str = "cpu"  # of the local model, the client's parts and the loopback peers
    dtype: str = "auto"  # likewise; auto: bfloat16 on GPUs, float32 on CPUs


@dataclass(frozen=True, slots=True)
class WireResult:
    """Decoding with hidden states under one wire compression (WIRE_COMPRESSIONS)."""

    compression: str
    decode_tokens_per_s: float
    max_logit_error: float  # max |swarm - local| over the prompt's logits
    relative_logit_error: float  # ||swarm - local|| / ||local|| over the same
    tokens_equal_local: bool  # the greedy continuation


@dataclass(frozen=True, slots=True)
class ConcurrentBatching:
    """How far concurrent sessions shared their work, over the runs of `--clients` sessions with LM heads: where
    their ratio to one session falls short, this tells whether their steps ran apart."""

    head_callers_per_pass: float  # sessions per pass through the client's LM head (`SharedPass`)
    peer_sessions_per_pass: tuple[float, ...]  # each loopback peer's sessions per decode forward pass, in order


class _BatchingMeter:
    """Sums how far concurrent sessions shared passes over the runs it counts (`counting`): through the client's
    LM head, and each loopback peer's decode forward passes (read from its metrics)."""

    def __init__(self, model: DistributedModelForCausalLM, metrics_urls: Sequence[str]):
        self._model = model
        self._metrics_urls = metrics_urls
        self._head = [0, 0]  # calls, passes
        self._peers = [[0.0, 0.0] for _ in metrics_urls]  # each peer's sessions, decode passes

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        before = self._totals()
        yield
        after = self._totals()
        for counted, now, then in zip([self._head, *self._peers], after, before, strict=True):
            counted[0] += now[0] - then[0]
            counted[1] += now[1] - then[1]

    def result(self) -> ConcurrentBatching:
        return ConcurrentBatching(
            self._head[0] / max(self._head[1], 1),
            tuple(sessions / max(passes, 1) for sessions, passes in self._peers),
        )

    def _totals(self) -> list[tuple[float, float]]:
        peers = [scraped_histogram(url, DECODE_BATCH_SESSIONS) for url in self._metrics_urls]
        return [self._model.client_modules.head_pass_counts(), *peers]


def _medians_in_turns(measures: Sequence[Callable[[], float]], repeats: int) -> list[float]:
    """The median of `repeats` results of each measure, taken one of each per round: on a machine whose speed
    drifts over minutes (a shared VM), every measure then sees the same drift, and their ratios hold."""
    results: list[list[float]] = [[] for _ in measures]
    for _ in range(repeats):
        for result, measure in zip(results, measures, strict=True):
            result.append(measure())
    return [statistics.median(result) for result in results]


@dataclass(frozen=True, slots=True)
class BenchResult:
    model: str
    peers: str  # "loopback swarm of N peers" or the initial peers given
    new_tokens: int
    local_decode_tokens_per_s: float
    swarm_decode_tokens_per_s: float
    decode_ratio: float  # swarm / local
    # the local model with its wide linear weights stored as the swarm's loaders store them on a CPU
    # (swarm/models/weight_layout.py): the swarm's own cost, apart from the faster layout; None where none is so
    local_column_major_decode_tokens_per_s: float | None
    unforwarded_decode_tokens_per_s: float  # the swarm's decode with each step sent to every span by the client
    forwarding_ratio: float  # swarm decode (peers forward steps to each other) / unforwarded
    unforwarded_ttft_s: float  # the swarm's time to first token likewise
    local_ttft_s: float
    swarm_ttft_s: float
    ttft_ratio: float  # swarm / local
    clients: int
    concurrent_tokens_per_s: float  # all clients together
    concurrency_ratio: float  # / one session's tokens/s
    concurrent_batching: ConcurrentBatching
    headless_steps_per_s: float  # the same sessions' steps without the clients' LM heads (`headless_session`)
    headless_concurrency_ratio: float  # / one such session's
    speculative_tokens_per_s: float
    speculative_ratio: float  # / plain decoding through the swarm
    draft_acceptance: float
    # checking several tokens in one pass rounds differently from one at a time: in 16-bit dtypes a near-tie can
    # go the other way, so this is reported, not required
    speculative_tokens_equal_local: bool
    long_prompt: int
    whole_prefill_s: float  # the long prompt sent whole to one span after another
    pipelined_prefill_s: float  # the same prompt in chunks flowing down the route
    pipelined_ratio: float  # pipelined / whole
    unforwarded_pipelined_prefill_s: float  # the pipelined prefill with each chunk sent to every span by the client
    wire: list[WireResult]
    device: str
    dtype: str
    tokens_equal_local: bool
    transport_floor: TransportFloor | None = None  # loopback swarms only
    local_token_time: TokenTime | None = None  # loopback swarms only, as the swarm's
    swarm_token_time: TokenTime | None = None

    def table(self) -> str:
        rows = [
            ("decode tokens/s", f"{self.local_decode_tokens_per_s:.1f}", f"{self.swarm_decode_tokens_per_s:.1f}",
             f"{self.decode_ratio:.2f}x"),
            *self._column_major_local_rows(),
            ("  without forwarding between peers", "", f"{self.unforwarded_decode_tokens_per_s:.1f}",
             f"forwarding: {self.forwarding_ratio:.2f}x"),
            ("time to first token", f"{self.local_ttft_s * 1000:.0f} ms", f"{self.swarm_ttft_s * 1000:.0f} ms",
             f"{self.ttft_ratio:.2f}x"),
            ("  without forwarding between peers", "", f"{self.unforwarded_ttft_s * 1000:.0f} ms",
             f"forwarding: {self.swarm_ttft_s / self.unforwarded_ttft_s:.2f}x"),
            (f"{self.clients} concurrent sessions, tokens/s", "", f"{self.concurrent_tokens_per_s:.1f}",
             f"{self.concurrency_ratio:.2f}x one session"),
            ("  sessions per pass", "", "", self._batching_note()),
            ("  the same without the LM heads, steps/s", "", f"{self.headless_steps_per_s:.1f}",
             f"{self.headless_concurrency_ratio:.2f}x one session"),
            ("speculative decoding, tokens/s", "", f"{self.speculative_tokens_per_s:.1f}",
             f"{self.speculative_ratio:.2f}x plain (acceptance {self.draft_acceptance:.0%}, tokens "
             f"{'equal' if self.speculative_tokens_equal_local else 'DIFFER'})"),
            (f"prefill of {self.long_prompt} tokens, pipelined", "", f"{self.pipelined_prefill_s * 1000:.0f} ms",
             f"{self.pipelined_ratio:.2f}x whole ({self.whole_prefill_s * 1000:.0f} ms)"),
            ("  without forwarding between peers", "", f"{self.unforwarded_pipelined_prefill_s * 1000:.0f} ms",
             f"forwarding: {self.pipelined_prefill_s / self.unforwarded_pipelined_prefill_s:.2f}x"),
            *((f"wire {w.compression}: decode tokens/s", "", f"{w.decode_tokens_per_s:.1f}",
               f"logits max error {w.max_logit_error:.2g}, relative {w.relative_logit_error:.2g}, "
               f"tokens {'equal' if w.tokens_equal_local else 'DIFFER'}") for w in self.wire),
            *self._floor_rows(),
            *self._token_time_rows(),
        ]  # fmt: skip
        header = ("", "local", "swarm", "ratio")
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in (header, *rows)
        ]
        title = f"{self.model} on {self.device} in {self.dtype} through {self.peers}, {self.new_tokens} new tokens"
        return "\n".join([f"{title}, medians", *lines])

    def _column_major_local_rows(self) -> list[tuple[str, str, str, str]]:
        column_major_local = self.local_column_major_decode_tokens_per_s
        if column_major_local is None:
            return []
        return [("  local, wide weights column-major as the swarm's", f"{column_major_local:.1f}", "",
                 f"swarm / it: {self.swarm_decode_tokens_per_s / column_major_local:.2f}x")]  # fmt: skip

    def _batching_note(self) -> str:
        batching = self.concurrent_batching
        note = f"client's LM head {batching.head_callers_per_pass:.1f}"
        if batching.peer_sessions_per_pass:
            peers = ", ".join(f"{sessions:.1f}" for sessions in batching.peer_sessions_per_pass)
            note += f"; peers' decode passes {peers}"
        return note

    def _floor_rows(self) -> list[tuple[str, str, str, str]]:
        floor = self.transport_floor
        if floor is None:
            return []
        # against the local model that computes as the swarm does, where the layouts differ
        local_s = 1 / (self.local_column_major_decode_tokens_per_s or self.local_decode_tokens_per_s)
        added_s = 1 / self.swarm_decode_tokens_per_s - local_s
        local = "its column-major local" if self.local_column_major_decode_tokens_per_s else "local"
        return [
            ("raw loopback round trip (p2pd alone)", "", f"{floor.round_trip_s * 1000:.2f} ms",
             f"a token's {floor.messages_per_token} messages: {floor.token_path_s * 1000:.2f} ms "
             f"of the {added_s * 1000:.2f} ms the swarm adds to {local}"),
            (f"  decode ratio to {local} with that cost alone", "", "",
             f"{local_s / (local_s + floor.token_path_s):.2f}x"),
        ]  # fmt: skip

    def _token_time_rows(self) -> list[tuple[str, str, str, str]]:
        local, swarm = self.local_token_time, self.swarm_token_time
        if local is None or swarm is None:
            return []
        peers = " + ".join(f"{seconds * 1000:.2f}" for seconds in swarm.peer_blocks_s)
        return [
            ("a decode token's time (one more run)", _ms(local.total_s), _ms(swarm.total_s), ""),
            ("  decoder blocks", _ms(local.blocks_s), _ms(swarm.blocks_s), f"the peers': {peers} ms"),
            ("  LM head", _ms(local.head_s), _ms(swarm.head_s), ""),
            ("  the rest", _ms(local.rest_s), _ms(swarm.rest_s),
             "swarm: the messages, scheduling and Python around them"),
        ]  # fmt: skip


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


@dataclass(frozen=True, slots=True)
class TransportFloor:
    """What the messages of a token's path cost at the least (swarm/transport_floor.py)."""

    round_trip_s: float  # a hidden state's median round trip through two loopback daemons, nothing else
    # a decode token's path with forwarding: client -> first peer -> ... -> last peer -> client
    messages_per_token: int
    token_path_s: float  # those messages at half the round trip each, plus the emulated network's delays


Progress = Callable[[str], None]  # told what the bench measures next, one line at a time
# one session's run through the swarm, given the model, the prompt and how many tokens to make
SessionRunner = Callable[[DistributedModelForCausalLM, torch.Tensor, int], Awaitable[object]]


def stderr_progress() -> Progress:
    """Progress lines on stderr, each with the seconds since the bench began: a bench takes minutes."""
    began = time.perf_counter()
    return lambda line: print(f"swarm bench [{time.perf_counter() - began:4.0f} s] {line}", file=sys.stderr, flush=True)


def run_bench(options: BenchOptions, progress: Progress = lambda line: None) -> BenchResult:
    torch.set_num_threads(options.num_threads)
    dtype = resolve_dtype(options.dtype, options.device)
    progress(f"loading {options.model} locally on {options.device}")
    local = AutoModelForCausalLM.from_pretrained(options.model, dtype=dtype).to(options.device).eval()
    # the local model as the swarm computes it, for the like-for-like decode row; None where the layouts agree
    column_major_local: PreTrainedModel | None = copy.deepcopy(local)
    if not store_wide_linears_column_major(column_major_local):
        column_major_local = None
    draft = column_major_local or local  # on the client, the draft computes as the client's own head does
    if options.draft is not None:
        draft = AutoModelForCausalLM.from_pretrained(options.draft, dtype=dtype).to(options.device).eval()
        store_wide_linears_column_major(draft)
    prompt = torch.randint(3, local.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(options.device)
    swarm = None
    try:
        initial_peers = options.initial_peers
        if not initial_peers:
            num_blocks = ModelSource.open(options.model).layout.num_blocks
            progress(f"starting a loopback swarm of {options.peers} peers")
            swarm = LocalSwarm(
                options.model,
                even_spans(num_blocks, options.peers),
                num_threads=options.num_threads,
                start_timeout=START_TIMEOUT_SECONDS,
                peer_args=[
                    *("--debug-added-latency-ms", str(options.added_latency_ms)),
                    *("--debug-added-peer-latency-ms", str(options.peer_latency_ms)),
                    *("--device", options.device, "--dtype", str(dtype).removeprefix("torch.")),
                    *("--metrics-port", "0"),  # each peer's compute, for the token's time
                ],
            ).start()
            initial_peers = tuple(swarm.initial_peers)
        floor = None
        if swarm is not None:
            progress("timing the transport's floor: a hidden state's round trip through two bare p2pd daemons")
            floor = _transport_floor(options, local.config.hidden_size, dtype)
        progress("connecting the client")
        config = ClientConfig(initial_peers=initial_peers, connect_timeout=START_TIMEOUT_SECONDS, verify_rate=0.0)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            options.model, config=config, dtype=dtype, device=options.device
        )
        try:
            run_sync(model.swarm.wait_blocks_covered(START_TIMEOUT_SECONDS))
            result = _measure(options, local, column_major_local, draft, model, prompt, swarm, progress)
            result = dataclasses.replace(result, transport_floor=floor)
            if swarm is None:
                return result
            progress("where a decode token's time goes: one more generation locally and through the swarm")
            local_time, swarm_time = _token_times(options, local, model, prompt, swarm)
            return dataclasses.replace(result, local_token_time=local_time, swarm_token_time=swarm_time)
        finally:
            model.close()
    finally:
        if swarm is not None:
            swarm.close()


def _transport_floor(options: BenchOptions, hidden_size: int, dtype: torch.dtype) -> TransportFloor:
    """The floor of a loopback swarm's messages, measured before its sessions start. A forwarded decode step
    crosses `peers + 1` messages, each half a round trip at the least; the emulated network adds half its round
    trip with the client on the first and the last, and half the round trip between peers on each push."""
    round_trip = asyncio.run(raw_round_trip_seconds(torch.zeros(1, 1, hidden_size, dtype=dtype), FLOOR_ROUND_TRIPS))
    messages = options.peers + 1
    emulated = options.added_latency_ms + (options.peers - 1) * options.peer_latency_ms / 2
    return TransportFloor(round_trip, messages, messages * round_trip / 2 + emulated / 1000)


def _token_times(
    options: BenchOptions,
    local: PreTrainedModel,
    model: DistributedModelForCausalLM,
    prompt: torch.Tensor,
    swarm: LocalSwarm,
) -> tuple[TokenTime, TokenTime]:
    """Where a decode token's time goes, locally and through the loopback swarm (whose peers serve the blocks in
    the order started), each from one more timed greedy generation."""

    def once(generator: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        return functools.partial(_greedy(generator, prompt), options.new_tokens, None)

    blocks = getattr(local.base_model, ModelSource.open(options.model).layout.blocks_attr)
    local_time = local_token_time(blocks, local.get_output_embeddings(), once(local.generate))
    urls = [swarm.metrics_url(peer) for peer in swarm.peers]
    swarm_time = swarm_token_time(model.client_modules.lm_head, urls, once(model.generate))
    return local_time, swarm_time


def _greedy(
    generator: Callable[..., torch.Tensor], prompt: torch.Tensor
) -> Callable[[int, BaseStreamer | None], torch.Tensor]:
    """`generator` (a `generate`) as `time_generate` calls it: greedy from `prompt`, `count` new tokens, with no
    end-of-sequence token to stop early."""
    return lambda count, streamer: generator(
        prompt, max_new_tokens=count, do_sample=False, eos_token_id=None, streamer=streamer
    )


def _measure(
    options: BenchOptions,
    local: PreTrainedModel,
    column_major_local: PreTrainedModel | None,
    draft: PreTrainedModel,
    model: DistributedModelForCausalLM,
    prompt: torch.Tensor,
    swarm: LocalSwarm | None,
    progress: Progress,
) -> BenchResult:
    def unforwarded_generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        with _client_config(model, forward_steps=False):
            return model.generate(*args, **kwargs)

    progress(
        f"decode and first token: the local model, the swarm and the swarm without forwarding in turns, "
        f"{options.repeats} rounds of {options.new_tokens} tokens after a warm-up"
    )
    generators = [
        _greedy(local.generate, prompt),
        _greedy(model.generate, prompt),
        _greedy(unforwarded_generate, prompt),
    ]
    if column_major_local is not None:
        generators.append(_greedy(column_major_local.generate, prompt))
    local_timing, swarm_timing, unforwarded, *column_major_timing = time_generates(
        generators, options.new_tokens, options.repeats
    )
    column_major_rate = column_major_timing[0].decode_tokens_per_s if column_major_timing else None
    local_ttft, local_rate = local_timing.ttft_s, local_timing.decode_tokens_per_s
    swarm_ttft, swarm_rate = swarm_timing.ttft_s, swarm_timing.decode_tokens_per_s
    expected = local_timing.output
    equal = all(torch.equal(timing.output, expected) for timing in (swarm_timing, unforwarded, *column_major_timing))

    progress(f"{options.clients} concurrent sessions and one, with the client's LM heads and without, in turns")
    meter = _BatchingMeter(model, [] if swarm is None else [swarm.metrics_url(peer) for peer in swarm.peers])

    def sessions(clients: int, session: SessionRunner = greedy_session) -> Callable[[], float]:
        return lambda: _concurrent_tokens_per_second(model, prompt, options.new_tokens, clients, session)

    def counted_sessions() -> float:
        with meter.counting():
            return sessions(options.clients)()

    concurrent, single, headless, headless_single = _medians_in_turns(
        [counted_sessions, sessions(1), sessions(options.clients, headless_session), sessions(1, headless_session)],
        options.repeats,
    )
    batching = meter.result()
    progress(f"speculative decoding, {options.draft_tokens} drafted tokens a round")
    speculative_seconds, acceptance, speculative_equal = [], 0.0, True
    for _ in range(options.repeats):
        began = time.perf_counter()
        speculated, stats = speculative_generate(
            model, draft, prompt, options.new_tokens, num_draft_tokens=options.draft_tokens
        )
        speculative_seconds.append(time.perf_counter() - began)
        speculative_equal &= torch.equal(speculated, expected)
        acceptance = stats.acceptance
    speculative_rate = options.new_tokens / statistics.median(speculative_seconds)
    long_prompt = torch.randint(
        3, local.config.vocab_size, (1, options.long_prompt), generator=torch.Generator().manual_seed(1)
    ).to(options.device)
    progress(
        f"prefill of {options.long_prompt} tokens: whole, and pipelined in chunks of {options.prefill_chunk}, in turns"
    )

    def unforwarded_prefill() -> float:
        with _client_config(model, forward_steps=False):
            return _prefill_seconds(model, long_prompt, options.prefill_chunk)

    prefills = [
        lambda: _prefill_seconds(model, long_prompt, 0),
        lambda: _prefill_seconds(model, long_prompt, options.prefill_chunk),
        unforwarded_prefill,
    ]
    for prefill in prefills:  # warm-ups
        prefill()
    whole, pipelined, unforwarded_pipelined = _medians_in_turns(prefills, options.repeats)
    plain_rate = options.new_tokens / swarm_timing.total_s  # whole calls, as the speculative ones are timed
    with torch.no_grad():
        local_logits = local(prompt).logits
    progress(f"wire compressions: {', '.join(WIRE_COMPRESSIONS)}")
    wire = [
        _wire_result(model, prompt, local_logits, expected, options.repeats, compression)
        for compression in WIRE_COMPRESSIONS
    ]
    equal &= wire[0].tokens_equal_local  # "none" is exact
    return BenchResult(
        model=str(options.model),
        peers=_described(options) if swarm is not None else " ".join(options.initial_peers),
        new_tokens=options.new_tokens,
        local_decode_tokens_per_s=local_rate,
        swarm_decode_tokens_per_s=swarm_rate,
        decode_ratio=swarm_rate / local_rate,
        local_column_major_decode_tokens_per_s=column_major_rate,
        unforwarded_decode_tokens_per_s=unforwarded.decode_tokens_per_s,
        forwarding_ratio=swarm_rate / unforwarded.decode_tokens_per_s,
        unforwarded_ttft_s=unforwarded.ttft_s,
        local_ttft_s=local_ttft,
        swarm_ttft_s=swarm_ttft,
        ttft_ratio=swarm_ttft / local_ttft,
        clients=options.clients,
        concurrent_tokens_per_s=concurrent,
        concurrency_ratio=concurrent / single,
        concurrent_batching=batching,
        headless_steps_per_s=headless,
        headless_concurrency_ratio=headless / headless_single,
        speculative_tokens_per_s=speculative_rate,
        speculative_ratio=speculative_rate / plain_rate,
        draft_acceptance=acceptance,
        speculative_tokens_equal_local=speculative_equal,
        long_prompt=options.long_prompt,
        whole_prefill_s=whole,
        pipelined_prefill_s=pipelined,
        pipelined_ratio=pipelined / whole,
        unforwarded_pipelined_prefill_s=unforwarded_pipelined,
        wire=wire,
        device=options.device,
        dtype=str(local.dtype).removeprefix("torch."),
        tokens_equal_local=equal,
    )


def _described(options: BenchOptions) -> str:
    latency = ""
    if options.added_latency_ms or options.peer_latency_ms:
        latency = (
            f" (added round trips: {options.added_latency_ms:g} ms with the client, "
            f"{options.peer_latency_ms:g} ms between peers)"
        )
    return f"a loopback swarm of {options.peers} peers{latency}"


@contextlib.contextmanager
def _client_config(model: DistributedModelForCausalLM, **changes: object) -> Iterator[None]:
    """The model's sessions opened meanwhile use the client config with `changes`."""
    saved = model.swarm.config
    model.swarm.config = dataclasses.replace(saved, **changes)  # type: ignore[arg-type]
    try:
        yield
    finally:
        model.swarm.config = saved


@dataclass(frozen=True, slots=True)
class GenerationTiming:
    new_tokens: int  # N
    ttft_s: float  # median time from the call until the first new token reaches the caller (a streamer)
    decode_tokens_per_s: float  # median (N - 1) / (time between the first and the last new token)
    total_s: float  # median time of the whole call (with the session's opening and closing)
    output: torch.Tensor  # the tokens of the last run


class TokenClock(BaseStreamer):
    """A `generate` streamer that notes when each new token reaches the caller, who could show it or send it on
    at that moment. generate's first `put` is the prompt."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.token_times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.token_times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def time_generate(
    generate: Callable[[int, BaseStreamer], torch.Tensor], new_tokens: int, repeats: int
) -> GenerationTiming:
    """Medians over `repeats` runs of `generate(new_tokens, streamer)`, after one warm-up run: the time to the
    first token and the decode rate after it, as a caller streaming the tokens sees them."""
    return time_generates([generate], new_tokens, repeats)[0]


def time_generates(
    generates: Sequence[Callable[[int, BaseStreamer], torch.Tensor]], new_tokens: int, repeats: int
) -> list[GenerationTiming]:
    """`time_generate` of each of `generates`, their runs taken in turns (one run of each per round): a machine
    whose speed drifts during the bench then weighs on every figure alike, not on whichever ran in its slow
    spell (this one's local decode rate has differed by 15% between runs)."""
    if new_tokens < 2:
        raise ValueError("a decode rate needs at least 2 new tokens")
    for generate in generates:
        generate(new_tokens, TokenClock())  # warm-up: allocations, routes, latency probes
    first: list[list[float]] = [[] for _ in generates]
    rates: list[list[float]] = [[] for _ in generates]
    totals: list[list[float]] = [[] for _ in generates]
    outputs: list[torch.Tensor | None] = [None for _ in generates]
    for _ in range(repeats):
        for index, generate in enumerate(generates):
            clock = TokenClock()
            outputs[index] = generate(new_tokens, clock)
            totals[index].append(time.perf_counter() - clock.began)
            times = clock.token_times
            if len(times) != new_tokens:
                raise RuntimeError(f"generate streamed {len(times)} tokens, not {new_tokens}")
            first[index].append(times[0] - clock.began)
            rates[index].append((new_tokens - 1) / max(times[-1] - times[0], 1e-9))
    timings = []
    for index, output in enumerate(outputs):
        assert output is not None
        timings.append(GenerationTiming(
            new_tokens, statistics.median(first[index]), statistics.median(rates[index]),
            statistics.median(totals[index]), output,
        ))  # fmt: skip
    return timings


def _concurrent_tokens_per_second(
    model: DistributedModelForCausalLM, prompt: torch.Tensor, new_tokens: int, clients: int, session: SessionRunner
) -> float:
    """Tokens/s of `clients` `session`s (greedy ones, or headless) decoding side by side (prompt included in the
    time)."""

    async def all_sessions() -> float:
        began = time.perf_counter()
        await asyncio.gather(*(session(model, prompt, new_tokens) for _ in range(clients)))
        return clients * new_tokens / (time.perf_counter() - began)

    return run_sync(all_sessions())


async def headless_session(model: DistributedModelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> None:
    """The prompt and `new_tokens - 1` decode steps through the swarm without the client's LM head: every step
    sends the prompt's last token again. The peers' work is that of greedy decoding (what the states hold does not
    change its cost); the head, which in a real swarm runs on each user's own machine, here would share the cores
    with the peers and the other sessions."""
    session = InferenceSession(model.swarm, prompt.shape[1] + new_tokens)
    try:
        with torch.no_grad():
            await session.step(model.client_modules.embed(prompt))
            for _ in range(new_tokens - 1):
                await session.step(model.client_modules.embed(prompt[:, -1:], session.position))
    finally:
        await session.close()


@dataclass(frozen=True, slots=True)
class SessionRun:
    """Greedy decoding through one bare `InferenceSession` (`greedy_session`)."""

    tokens: torch.Tensor  # the prompt, then the greedy tokens
    prompt_outputs: torch.Tensor  # the last block's output for the prompt, on the client's device and dtype
    decode_s: float  # seconds of the steps after the prompt's


async def greedy_session(
    model: DistributedModelForCausalLM, prompt: torch.Tensor, new_tokens: int, wire_compression: str | None = None
) -> SessionRun:
    """`new_tokens` greedy tokens after `prompt`, one session step each (no `generate`): sessions started side by
    side reach the peers together, and the peers batch their decode steps."""
    session = InferenceSession(model.swarm, prompt.shape[1] + new_tokens, wire_compression=wire_compression)

    def next_token(outputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # grad mode is per thread
            return model.client_modules.logits(outputs, caller=session).argmax(-1)

    try:
        with torch.no_grad():
            hidden = model.client_modules.embed(prompt)
            prompt_outputs = (await session.step(hidden)).to(hidden)
            tokens = [await asyncio.to_thread(next_token, prompt_outputs[:, -1:])]
            began = time.perf_counter()
            for _ in range(new_tokens - 1):
                outputs = await session.step(model.client_modules.embed(tokens[-1], session.position))
                tokens.append(await asyncio.to_thread(next_token, outputs.to(hidden)))
            return SessionRun(torch.cat([prompt, *tokens], dim=1), prompt_outputs, time.perf_counter() - began)
    finally:
        await session.close()


def _prefill_seconds(model: DistributedModelForCausalLM, prompt: torch.Tensor, chunk: int) -> float:
    """Seconds of a session's first step over `prompt`, chunked by `chunk` tokens (0: whole), after the session's
    streams are open (a one-token step opens them first)."""

    async def once() -> float:
        session = InferenceSession(model.swarm, prompt.shape[1] + 1, prefill_chunk_tokens=chunk)
        try:
            with torch.no_grad():
                hidden = model.client_modules.embed(prompt)
                await session.step(hidden[:, :1])  # opens every span's stream
                began = time.perf_counter()
                await session.step(hidden[:, 1:])
                return time.perf_counter() - began
        finally:
            await session.close()

    return run_sync(once())


def _wire_result(
    model: DistributedModelForCausalLM,
    prompt: torch.Tensor,
    local_logits: torch.Tensor,
    expected: torch.Tensor,
    repeats: int,
    compression: str,
) -> WireResult:
    """Greedy decoding through sessions whose hidden states travel under `compression`: the median decode rate,
    the prompt's logits against `local_logits`, and the tokens against `expected` (local greedy output)."""
    new_tokens = expected.shape[1] - prompt.shape[1]
    runs = [run_sync(greedy_session(model, prompt, new_tokens, compression)) for _ in range(repeats + 1)][1:]
    with torch.no_grad():  # the first run above warmed up
        logits = model.client_modules.logits(runs[-1].prompt_outputs)
    error = (logits.float() - local_logits.float()).flatten()
    return WireResult(
        compression=compression,
        decode_tokens_per_s=statistics.median((new_tokens - 1) / max(run.decode_s, 1e-9) for run in runs),
        max_logit_error=error.abs().max().item(),
        relative_logit_error=(error.norm() / local_logits.float().norm()).item(),
        tokens_equal_local=torch.equal(runs[-1].tokens, expected),
    )


def print_result(result: BenchResult, json_path: Path | None) -> int:
    print(result.table())
    if json_path is not None:
        json_path.write_text(json.dumps(asdict(result), indent=2) + "\n")
        print(f"JSON: {json_path}")
    if not result.tokens_equal_local:
        print("FAILED: the swarm's tokens differ from the local model's", file=sys.stderr)
        return 1
    return 0
