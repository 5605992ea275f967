"""Peers without --blocks on a 12-block model: three cover it together, a fourth takes the weakest region, and
when a peer leaves, another moves to cover the gap while a session through the swarm completes unharmed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.block_selection import choose_span
from swarm import DistributedModelForCausalLM
from swarm.client._sync import run_sync
from swarm.directory import SwarmView
from swarm.process import SwarmProcess
from swarm.testing import LocalSwarm
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE
from tests.prometheus_tools import wait_for

pytestmark = pytest.mark.slow

NUM_BLOCKS = 12
TIMEOUT = 120.0
# Short periods so that moves happen within the test; hysteresis as in production.
AUTO = ["--start-jitter", "2", "--balance-period", "3", "--drain-timeout", "5"]
CHOSE_LINE = r"Chose blocks (\d+):(\d+) of 12"
GREEDY = dict(do_sample=False, eos_token_id=None)


@dataclass
class Balanced:
    swarm: LocalSwarm
    first_three: list[SwarmProcess]
    client: DistributedModelForCausalLM
    model_dir: Path

    def view(self) -> SwarmView:
        return run_sync(self.client.swarm.view(max_age=0))

    def online_spans(self) -> list[tuple[int, int]]:
        return sorted((s.start, s.end) for s in self.view().spans if s.info.state.routable)


@pytest.fixture(scope="module")
def balanced(make_swarm, connect, tiny_model_dir, tmp_path_factory) -> Iterator[Balanced]:
    """Three peers with budgets of 4, 4 and 5 blocks, started together, none told which blocks to serve."""
    model_dir = tiny_model_dir("llama", NUM_BLOCKS)
    cache = tmp_path_factory.mktemp("throughput") / "throughput.json"
    local_swarm = make_swarm(model_dir, [], env={"BLOCKSWARM_THROUGHPUT_CACHE": str(cache)})
    peers = [
        local_swarm.add_auto_peer("--num-blocks", str(n), *AUTO, name=f"swarm-peer[auto-{i}]", wait=False)
        for i, n in enumerate([4, 4, 5])
    ]
    for peer in peers:
        peer.wait_for_line(r"Serving blocks", TIMEOUT)
    client = connect(model_dir, local_swarm, connect_timeout=TIMEOUT)
    yield Balanced(local_swarm, peers, client, model_dir)


def test_three_peers_without_blocks_cover_the_model(balanced: Balanced) -> None:
    # peers started together may collide at first; rebalancing then closes any gap
    wait_for(lambda: not balanced.view().missing_blocks(), TIMEOUT, "the three peers to cover all 12 blocks")
    spans = balanced.online_spans()
    assert len(spans) == 3 and sorted(end - start for start, end in spans) == [4, 4, 5]
    for peer in balanced.first_three:
        assert re.search(CHOSE_LINE, peer.output()), peer.output()[-2000:]


def test_a_fourth_peer_takes_the_weakest_region(balanced: Balanced) -> None:
    wait_for(lambda: not balanced.view().missing_blocks(), TIMEOUT, "full coverage")
    throughputs = balanced.view().block_throughputs()
    fourth = balanced.swarm.add_auto_peer("--num-blocks", "4", *AUTO, name="swarm-peer[auto-3]")
    start, end = (int(x) for x in fourth.wait_for_line(CHOSE_LINE, TIMEOUT).groups())
    assert (start, end) == choose_span(throughputs, 4)
    weakest = min(range(NUM_BLOCKS), key=throughputs.__getitem__)
    assert start <= weakest < end
    assert LocalSwarm.served_span(fourth) == (start, end)


def test_a_gap_left_by_a_departing_peer_is_covered_by_a_move_under_a_live_session(balanced: Balanced) -> None:
    fourth = balanced.swarm.peers[-1]
    fourth_span = LocalSwarm.served_span(fourth)
    # a peer whose blocks the fourth does not share: its leaving opens a gap only a move can close
    (leaving,) = [
        peer for peer in balanced.first_three
        if not set(range(*LocalSwarm.served_span(peer))) & set(range(*fourth_span))
    ][:1]  # fmt: skip
    gap_span = LocalSwarm.served_span(leaving)
    first_turn, second_turn = (
        torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1, n), generator=torch.Generator().manual_seed(n))
        for n in (6, 3)
    )
    local = AutoModelForCausalLM.from_pretrained(balanced.model_dir).eval()
    first_options, second_options = (dict(max_new_tokens=n, min_new_tokens=n, **GREEDY) for n in (6, 10))
    expected_first = local.generate(first_turn, **first_options)
    expected_second = local.generate(torch.cat([expected_first, second_turn], dim=1), **second_options)

    client = balanced.client
    with client.inference_session(max_length=64) as session:
        first = client.generate(first_turn, **first_options)
        leaving.terminate()  # SIGTERM: it drains (our session is open on it), then leaves
        assert leaving.returncode is not None
        # the next step finds the peer gone, and waits for a route until some peer has moved over the gap
        second = client.generate(second_turn, **second_options)
    assert torch.equal(first, expected_first)
    assert torch.equal(second, expected_second)
    assert session.reroutes >= 1

    missing = set(range(*gap_span)) - {i for s in balanced.online_spans() for i in range(*s)}
    assert not missing or wait_for(lambda: not balanced.view().missing_blocks(), TIMEOUT, "the gap to be covered")
    movers = [peer for peer in balanced.swarm.peers if "Moving from blocks" in peer.output()]
    assert movers, "no peer moved"
    assert not balanced.view().missing_blocks()
