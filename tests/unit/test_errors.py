"""Errors tell the user what is wrong and what to do."""

from __future__ import annotations

from swarm.errors import MissingBlocksError, PeerTimeout, SwarmError


def test_missing_blocks_message_names_ranges_and_the_fix() -> None:
    error = MissingBlocksError("llama-3-2-1b", [7, 3, 4, 5, 9])
    assert error.block_indices == [3, 4, 5, 7, 9]
    assert "blocks 3:6, 7:8, 9:10 of llama-3-2-1b have no live peer" in str(error)
    assert "swarm-peer llama-3-2-1b --blocks 3:6" in str(error)


def test_peer_errors_carry_the_peer() -> None:
    error = PeerTimeout("12D3KooWabcdefXYZ123", "did not answer in time")
    assert isinstance(error, SwarmError) and error.peer_id.endswith("XYZ123")
    assert "…XYZ123" in str(error)
