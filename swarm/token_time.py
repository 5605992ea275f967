"""Where a decode token's time goes, for `swarm bench`: the decoder blocks, the LM head, and the rest.

Locally, forward hooks time the model's blocks (from the first block's input to the last block's output) and its
LM head during a greedy generation; a token's whole time is the interval from one LM head pass to the next. Through a
loopback swarm, the same hooks time the client's LM head and the tokens, and each peer's own
`blockswarm_inference_step_duration_seconds` (decode phase), read from its metrics before and after the generation,
gives its compute per step. What is left of a token's time is the rest: for the local model `generate`'s own work,
embeddings and norms; for the swarm also every message, the scheduling and the Python around them, which is the
part of the gap to local that is this implementation's own.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

STEP_DURATION = "blockswarm_inference_step_duration_seconds"
SCRAPE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class TokenTime:
    """One decode token's time, split (seconds; medians over a generation's decode steps, the peers' means)."""

    total_s: float  # from one LM head pass to the next
    blocks_s: float  # every decoder block: the local model's, or the peers' steps one after another
    head_s: float  # the LM head (on the client, for a swarm)
    peer_blocks_s: tuple[float, ...] = ()  # a swarm's, each peer's step, in route order

    @property
    def rest_s(self) -> float:
        return self.total_s - self.blocks_s - self.head_s


@dataclass(slots=True)
class _Passes:
    """The passes through some modules while they were timed: when each began, and how long each took."""

    starts: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)

    def decode_duration(self) -> float:
        """The median pass, the first (the prompt's) left out."""
        if len(self.durations) < 2:
            raise RuntimeError("no decode pass was timed: the generation made fewer than 2 new tokens")
        return statistics.median(self.durations[1:])

    def decode_interval(self) -> float:
        """The median time from the start of one pass to the next."""
        if len(self.starts) < 2:
            raise RuntimeError("no decode pass was timed: the generation made fewer than 2 new tokens")
        return statistics.median(later - earlier for earlier, later in itertools.pairwise(self.starts))


@contextlib.contextmanager
def _timed(first: nn.Module, last: nn.Module) -> Iterator[_Passes]:
    """Every pass from `first`'s input to `last`'s output, collected while in the block. On a GPU each hook waits
    for the work queued before it, so that a pass is timed as computed, not as queued."""
    passes = _Passes()
    device = next(first.parameters()).device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda _: None

    def began(*_: object) -> None:
        synchronize(device)
        passes.starts.append(time.perf_counter())

    def ended(*_: object) -> None:
        synchronize(device)
        passes.durations.append(time.perf_counter() - passes.starts[-1])

    handles = [first.register_forward_pre_hook(began), last.register_forward_hook(ended)]
    try:
        yield passes
    finally:
        for handle in handles:
            handle.remove()


def local_token_time(blocks: Sequence[nn.Module], head: nn.Module, generate: Callable[[], object]) -> TokenTime:
    """The local model's token: `generate()` runs a greedy generation with these `blocks` and `head`."""
    with _timed(blocks[0], blocks[-1]) as block_passes, _timed(head, head) as head_passes:
        generate()
    return TokenTime(head_passes.decode_interval(), block_passes.decode_duration(), head_passes.decode_duration())


def swarm_token_time(head: nn.Module, metrics_urls: Sequence[str], generate: Callable[[], object]) -> TokenTime:
    """A swarm's token: `head` is the client's LM head, `metrics_urls` the route's peers in order (each serving
    its own span), `generate()` a greedy generation through the swarm."""
    before = [_decode_steps(url) for url in metrics_urls]
    with _timed(head, head) as head_passes:
        generate()
    peers = []
    for url, (seconds_before, count_before) in zip(metrics_urls, before, strict=True):
        seconds, count = _decode_steps(url)
        if count <= count_before:
            raise RuntimeError(f"the peer at {url} ran no decode step during the generation")
        peers.append((seconds - seconds_before) / (count - count_before))
    return TokenTime(head_passes.decode_interval(), sum(peers), head_passes.decode_duration(), tuple(peers))


def _decode_steps(metrics_url: str) -> tuple[float, int]:
    """A peer's decode steps so far, from its metrics: their total seconds and their number."""
    seconds, count = scraped_histogram(metrics_url, STEP_DURATION, phase="decode")
    return seconds, int(count)


def scraped_histogram(metrics_url: str, name: str, **labels: str) -> tuple[float, float]:
    """The sum and the count of a histogram (the series with `labels`) in a peer's metrics; zeros before it
    has any observation."""
    with urllib.request.urlopen(metrics_url, timeout=SCRAPE_TIMEOUT_SECONDS) as response:
        text = response.read().decode()
    total, count = 0.0, 0.0
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if any(sample.labels.get(key) != value for key, value in labels.items()):
                continue
            if sample.name == f"{name}_sum":
                total = sample.value
            elif sample.name == f"{name}_count":
                count = sample.value
    return total, count
