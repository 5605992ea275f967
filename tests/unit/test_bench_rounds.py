"""`swarm bench` takes the runs that a ratio compares in turns, so that a drifting machine moves both sides alike."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from swarm.bench import _medians_in_turns


def test_measures_run_one_of_each_per_round_and_give_their_medians() -> None:
    calls: list[str] = []
    drift = itertools.count(1)  # the machine slows down by one unit per run

    def measure(name: str, cost: float) -> Callable[[], float]:
        def run() -> float:
            calls.append(name)
            return cost * next(drift)

        return run

    whole, pipelined = _medians_in_turns([measure("whole", 2.0), measure("pipelined", 1.0)], repeats=3)

    assert calls == ["whole", "pipelined"] * 3
    assert (whole, pipelined) == (2.0 * 3, 1.0 * 4)  # the middle rounds' runs: 2 x (1, 3, 5), 1 x (2, 4, 6)
    assert pipelined / whole == 4 / 6  # taken one after another, all whole runs first, it would be 5 / 4
