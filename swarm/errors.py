"""Every error blockswarm raises on purpose, so callers can react by type.

    SwarmError
      + ConfigError              a flag, argument or environment value that cannot work
      + ModelError               a checkpoint that cannot be sliced
      |   + ModelNotFoundError   not a model directory, not in the Hugging Face cache
      |   + UnsupportedModelError  an architecture the generic slicer cannot run exactly
      |   + BlockRangeError      a block range outside the model
      + ProtocolError            a message that does not follow swarm/protocol.py
      + RoutingError             no usable chain of peers
      |   + MissingBlocksError   some blocks have no live peer
      + PeerError                one remote peer failed: ban it and route around it
      |   + PeerTimeout
      |   + PeerUnreachable
      |   + PeerProtocolError
      + RequestRejected          a peer refused the request
          + CacheFullError       no KV-cache room left there (another peer may have some)
          + PeerLeaving          the peer is draining and takes no new sessions
          + InvalidRequest       the request itself is wrong (shape, length, limits): no retry helps

The type decides the reaction: `PeerError`, `CacheFullError` and `PeerLeaving` mean "try another peer"
(`RETRYABLE_ERRORS`); the rest reach the caller.
"""

from __future__ import annotations

from collections.abc import Iterable

from swarm.logs import short_id


class SwarmError(Exception):
    """Base of every error raised on purpose by blockswarm."""


class ConfigError(SwarmError, ValueError):
    """A configuration that cannot work."""


class ModelError(SwarmError):
    """A model checkpoint that cannot be loaded or sliced."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """Neither a model directory nor a model in the Hugging Face cache."""


class UnsupportedModelError(ModelError):
    """An architecture that the generic block slicer cannot run exactly."""


class BlockRangeError(ModelError, ValueError):
    """A block range that does not lie inside the model."""


class ProtocolError(SwarmError, ValueError):
    """A message that does not follow the wire contract in swarm/protocol.py."""


class RoutingError(SwarmError):
    """No usable chain of peers covers the model."""


class MissingBlocksError(RoutingError):
    """Some blocks have no live peer."""

    def __init__(self, model: str, block_indices: Iterable[int], detail: str = ""):
        self.model = model
        self.block_indices = sorted(set(block_indices))
        ranges = _format_ranges(self.block_indices)
        super().__init__(
            f"blocks {ranges} of {model} have no live peer{detail}; "
            f"start one with `swarm-peer {model} --blocks {_first_range(self.block_indices)}`"
        )


class PeerError(SwarmError):
    """One remote peer failed; the client bans it for a while and routes around it."""

    def __init__(self, peer_id: str, message: str):
        self.peer_id = peer_id
        super().__init__(f"peer {short_id(peer_id)}: {message}")


class PeerTimeout(PeerError):
    """A peer did not answer in time."""


class PeerUnreachable(PeerError):
    """A peer could not be reached or closed the connection."""


class PeerFaulty(PeerError):
    """The peer's output disagreed with two independent computations of the same step (swarm/client/verification.py)."""


class PeerProtocolError(PeerError):
    """A peer answered with something that does not follow the protocol."""


class RequestRejected(SwarmError):
    """A peer refused the request."""

    def __init__(self, message: str, peer_id: str | None = None):
        self.peer_id = peer_id
        super().__init__(message)


class CacheFullError(RequestRejected):
    """A peer (or every peer of some blocks) has no KV-cache room left for a new session."""


class PeerLeaving(RequestRejected):
    """A draining peer takes no new sessions."""


class InvalidRequest(RequestRejected):
    """The request breaks a peer's limits or the protocol; sending it elsewhere will not help."""


RETRYABLE_ERRORS = (PeerError, CacheFullError, PeerLeaving)


def _format_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0:3, 5:6' (half-open, like --blocks)."""
    parts: list[str] = []
    start = prev = None
    for index in indices:
        if start is None:
            start = prev = index
        elif index == prev + 1:
            prev = index
        else:
            parts.append(f"{start}:{prev + 1}")
            start = prev = index
    if start is not None:
        parts.append(f"{start}:{prev + 1}")
    return ", ".join(parts)


def _first_range(indices: list[int]) -> str:
    return _format_ranges(indices).split(",")[0] if indices else ""
