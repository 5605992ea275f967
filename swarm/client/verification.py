"""Spot checks of untrusted peers: a sampled step is recomputed by an independent peer and the outputs compared.

In an open swarm a peer can return well-formed but wrong hidden states (a bug, broken hardware, a cheater), and
nothing else would notice. For a share `verify_rate` of the steps each span of an inference session sends (and of
stateless forward calls), the client sends the same inputs, the span's whole history for a session, through a
route that avoids that peer and compares the outputs within a dtype-aware tolerance:

  * they agree: nothing happens;
  * they disagree: a third route, avoiding both, decides. The side that disagrees with it is faulty: a faulty
    session peer raises `PeerFaulty`, so the session bans it, rebuilds its cache elsewhere and recomputes the step
    (the caller's output stays correct); faulty verifiers are banned. Without a third source the check is
    inconclusive and logged.

Which steps are checked is random but never far apart: the gap to the next check is drawn uniformly from
1 .. 2/rate - 1 steps (mean 1/rate), so a peer that is wrong on every step is caught within 2/rate - 1 of them,
and it cannot know which of its answers will be checked. Every outcome is counted in the client metric
`blockswarm_client_verifications_total{outcome}`.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from swarm.client.metrics import client_metrics
from swarm.client.routing import RouteSpan
from swarm.errors import SwarmError
from swarm.logs import short_id

if TYPE_CHECKING:
    from swarm.client.swarm_client import SwarmClient

logger = logging.getLogger(__name__)

# |ours - theirs| <= RTOL * max|theirs| + ATOL, element-wise maximum. Honest peers differ by summation order only
# (cached vs full recompute, CPU vs GPU kernels): about 1e-6 relative in float32, 1e-2 in 16-bit formats.
TOLERANCES = {torch.float32: (1e-3, 1e-5), torch.float64: (1e-6, 1e-9)}
HALF_PRECISION_TOLERANCE = (5e-2, 1e-3)


class Outcome(str, enum.Enum):
    AGREED = "agreed"
    PEER_FAULTY = "peer_faulty"
    VERIFIER_FAULTY = "verifier_faulty"
    INCONCLUSIVE = "inconclusive"
    UNVERIFIABLE = "unverifiable"


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    detail: str = ""
    faulty: tuple[str, ...] = ()  # VERIFIER_FAULTY: the verifiers' peer ids


class CheckSchedule:
    """When to check: after a uniform random gap of 1 .. 2/rate - 1 steps (every step at rate 1, never at 0)."""

    def __init__(self, rate: float, rng: random.Random | None = None):
        self.rate = rate
        self._rng = rng or random.Random()
        self._countdown = self._gap()

    def due(self) -> bool:
        if self.rate <= 0:
            return False
        self._countdown -= 1
        if self._countdown > 0:
            return False
        self._countdown = self._gap()
        return True

    def _gap(self) -> int:
        if self.rate <= 0:
            return 0
        return self._rng.randint(1, max(1, round(2 / self.rate) - 1))


def outputs_agree(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether two computations of the same hidden states agree up to the rounding of their dtype."""
    if ours.shape != theirs.shape:
        return False
    rtol, atol = TOLERANCES.get(theirs.dtype, HALF_PRECISION_TOLERANCE)
    ours, theirs = ours.double(), theirs.double()
    if not (torch.isfinite(ours).all() and torch.isfinite(theirs).all()):
        return False
    return float((ours - theirs).abs().max()) <= rtol * float(theirs.abs().max()) + atol


Recompute = Callable[[Collection[str]], Awaitable[tuple[torch.Tensor, list[str]]]]
"""Computes the checked outputs again avoiding the given peers; returns them and the peers that computed them."""


async def check_span(swarm: SwarmClient, span: RouteSpan, outputs: torch.Tensor, recompute: Recompute) -> Verdict:
    """Compare `outputs`, what `span.peer_id` returned, with independent recomputations; ban a faulty verifier;
    record and log the outcome. The caller acts on `PEER_FAULTY` (ban the peer, compute the step elsewhere)."""
    verdict = await _judge(span, outputs, _or_none(recompute, span))
    client_metrics().verifications.labels(verdict.outcome.value).inc()
    if verdict.outcome is Outcome.PEER_FAULTY:
        logger.warning("Peer %s returned wrong outputs for blocks %d:%d: %s", short_id(span.peer_id),
                       span.start, span.end, verdict.detail)  # fmt: skip
    elif verdict.outcome is Outcome.VERIFIER_FAULTY:
        for verifier in verdict.faulty:
            swarm.ban(verifier, "returned outputs that two other sources contradict")
    if verdict.outcome in (Outcome.VERIFIER_FAULTY, Outcome.INCONCLUSIVE):
        logger.warning("Spot check of blocks %d:%d on %s: %s", span.start, span.end, short_id(span.peer_id),
                       verdict.detail)  # fmt: skip
    return verdict


async def _judge(
    span: RouteSpan,
    outputs: torch.Tensor,
    recompute: Callable[[Collection[str]], Awaitable[tuple[torch.Tensor, list[str]] | None]],
) -> Verdict:
    first = await recompute({span.peer_id})
    if first is None:
        return Verdict(Outcome.UNVERIFIABLE, "no other peer serves these blocks")
    reference, verifiers = first
    if outputs_agree(outputs, reference):
        return Verdict(Outcome.AGREED)
    second = await recompute({span.peer_id, *verifiers})
    if second is None:
        return Verdict(Outcome.INCONCLUSIVE, f"it disagrees with {_names(verifiers)} and no third source is free")
    decider, deciders = second
    if outputs_agree(decider, reference):
        return Verdict(Outcome.PEER_FAULTY, f"{_names(verifiers)} and {_names(deciders)} agree with each other")
    if outputs_agree(decider, outputs):
        return Verdict(
            Outcome.VERIFIER_FAULTY, f"{_names(verifiers)} disagreed with it and {_names(deciders)}", tuple(verifiers)
        )
    return Verdict(Outcome.INCONCLUSIVE, "three sources gave three different outputs")


def _or_none(
    recompute: Recompute, span: RouteSpan
) -> Callable[[Collection[str]], Awaitable[tuple[torch.Tensor, list[str]] | None]]:
    """`recompute`, with None when no peer outside `exclude` can do it (or all that tried failed)."""

    async def attempt(exclude: Collection[str]) -> tuple[torch.Tensor, list[str]] | None:
        try:
            return await recompute(exclude)
        except SwarmError as e:  # missing blocks, or every replacement failed
            logger.debug("Recomputing blocks %d:%d for a spot check failed: %s", span.start, span.end, e)
            return None

    return attempt


def _names(peer_ids: list[str]) -> str:
    return " => ".join(short_id(peer_id) for peer_id in peer_ids)
