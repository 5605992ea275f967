"""Spot-check pieces that need no swarm: the tolerance, the schedule, and who a vote blames."""

from __future__ import annotations

import asyncio
import itertools
import random

import torch

from swarm.client.routing import RouteSpan
from swarm.client.verification import CheckSchedule, Outcome, _judge, outputs_agree

SPAN = RouteSpan("peer-under-check", 0, 4)


def test_outputs_agree_up_to_rounding_and_not_beyond() -> None:
    theirs = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * 4
    assert outputs_agree(theirs + 1e-6, theirs)
    assert not outputs_agree(theirs + 0.05, theirs)
    half = theirs.bfloat16()
    assert outputs_agree((theirs * (1 + 2**-8)).bfloat16(), half)  # one bfloat16 rounding step
    assert not outputs_agree(half + 1.0, half)
    assert not outputs_agree(theirs[:, :4], theirs)
    assert not outputs_agree(theirs * float("nan"), theirs)


def test_checks_come_at_random_but_bounded_gaps() -> None:
    schedule = CheckSchedule(0.1, random.Random(0))
    due = [step for step in range(2000) if schedule.due()]
    gaps = [b - a for a, b in itertools.pairwise(due)]
    assert max(gaps) <= 19 and min(gaps) >= 1
    assert 8 < sum(gaps) / len(gaps) < 12  # about 1 / rate
    assert len(set(gaps)) > 5  # not a fixed period a cheater could predict
    assert all(CheckSchedule(1.0).due() for _ in range(10))
    assert not any(CheckSchedule(0.0).due() for _ in range(100))


def _sources(*answers: tuple[torch.Tensor, list[str]] | None):  # type: ignore[no-untyped-def]
    calls = []

    async def recompute(exclude):  # type: ignore[no-untyped-def]
        calls.append(set(exclude))
        return answers[len(calls) - 1]

    return recompute, calls


def test_a_vote_blames_the_side_the_third_source_contradicts() -> None:
    right, wrong = torch.ones(1, 1, 4), torch.full((1, 1, 4), 2.0)
    recompute, calls = _sources((right, ["a"]), (right, ["b"]))
    assert asyncio.run(_judge(SPAN, wrong, recompute)).outcome is Outcome.PEER_FAULTY
    assert calls == [{"peer-under-check"}, {"peer-under-check", "a"}]

    recompute, _ = _sources((wrong, ["a"]), (right, ["b"]))
    verdict = asyncio.run(_judge(SPAN, right, recompute))
    assert verdict.outcome is Outcome.VERIFIER_FAULTY and verdict.faulty == ("a",)

    recompute, calls = _sources((right, ["a"]))
    assert asyncio.run(_judge(SPAN, right, recompute)).outcome is Outcome.AGREED and len(calls) == 1
    recompute, _ = _sources((right, ["a"]), None)
    assert asyncio.run(_judge(SPAN, wrong, recompute)).outcome is Outcome.INCONCLUSIVE
    recompute, _ = _sources(None)
    assert asyncio.run(_judge(SPAN, wrong, recompute)).outcome is Outcome.UNVERIFIABLE
