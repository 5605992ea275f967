"""The wire contract between peers, clients and monitors: DHT keys and records, RPC names, request metadata.

DHT layout (hivemind Kademlia, values msgpack-encoded by hivemind):
  * `{model_prefix}.{block_index}`  subkey = peer id (base58)  -> `ServerInfo.to_wire()`, one per hosted block,
                                   signed by that peer's identity key (swarm/signed_records.py)
  * `blockswarm.models`            subkey = model prefix       -> `ModelRecord.to_wire()`, one per served model

RPCs (hivemind P2P protobuf handlers; requests are `ExpertRequest`, replies `ExpertResponse`, metadata msgpack):
  * RPC_INFO        unary            -> `PeerInfo`
  * RPC_INFERENCE   stream <-> stream  first message `InferenceOpen` + `InferenceStep` (or `InferenceOpen` alone,
                                      no tensors: the session is set up ahead of its first step), then
                                      `InferenceStep`s, each answered;
                                      the peer keeps the session's KV cache until the stream closes; the first
                                      message may carry a LoRA adapter and deep prompts as RPC_FORWARD does
                                      (tensors [hidden, *lora, prompts]), applied to every step of the session;
                                      a step that starts before the cached tokens' end rolls the cache back to it;
                                      a step with `forward_to` is also sent on by the peer to the first target's
                                      peer (RPC_PUSH, with the other targets), and its reply says
                                      `{"forwarded": true}` when that push is under way; if the push then fails,
                                      a message `{"push_failed": step}` (no tensors) follows, between answers
  * RPC_PUSH        stream <-> stream  `ForwardedStep`s, tensors [hidden], each answered by an empty reply
                                      (taken) or an error, which ends the stream; the receiving peer runs each as
                                      the next step of the session `session` names and answers it on that
                                      session's stream, as if the client had sent it (one push stream per session
                                      and next peer, for as long as the session lasts)
  * RPC_FORWARD     unary or stream  `SpanRequest`, tensors [hidden, *lora]            -> [hidden]
  * RPC_BACKWARD    unary or stream  `SpanRequest`, tensors [hidden, grad_out, *lora]  -> [grad_in, *grad_lora]
                                      with `{"lora": LoraHeader}` in the metadata, the caller's LoRA adapter for
                                      the span travels as `*lora` (layout in swarm/models/lora.py); with
                                      `{"deep_prompts": true}`, one more tensor [span blocks, pre_seq_len, hidden]
                                      follows (swarm/models/deep_prompts.py) and its gradient ends the reply
`InferenceOpen.compression` and `SpanRequest.compression` say how hidden states and their gradients travel:
the client encodes its tensors so and the peer answers in kind; LoRA tensors and their gradients are always exact.
A reply that carries `{"error": ErrorReply}` in its metadata is a refusal; the stream ends after it.

`from_wire` ignores unknown keys (newer peers may add fields) and raises `ProtocolError` on missing or ill-typed
ones; nothing here asserts.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, TypeVar

from swarm.errors import ProtocolError

PROTOCOL_VERSION = 2  # 2: RPC_PUSH is a stream
MODELS_KEY = "blockswarm.models"

RPC_INFO = "blockswarm.info"
RPC_INFERENCE = "blockswarm.inference"
RPC_FORWARD = "blockswarm.forward"
RPC_FORWARD_STREAM = "blockswarm.forward_stream"
RPC_BACKWARD = "blockswarm.backward"
RPC_BACKWARD_STREAM = "blockswarm.backward_stream"
RPC_PUSH = "blockswarm.push"

# How activations (hidden states and their gradients) may travel, chosen by the client per session or call; the
# peer answers in kind (swarm/compression.py): "none" is exact, "fp16" halves float32, "8bit" quarters it
WIRE_COMPRESSIONS = ("none", "fp16", "8bit")

MAX_UNARY_PAYLOAD_BYTES = 4 * 1024 * 1024 - 64 * 1024  # hivemind's unary cap is 4 MiB; keep room for metadata
STREAM_CHUNK_BYTES = 2 * 1024 * 1024
MAX_SESSION_ID_CHARS = 64
MAX_FORWARD_TARGETS = 64  # spans after one that a step may be forwarded through
MAX_FORWARD_TIMEOUT = 60.0  # seconds


def block_key(model_prefix: str, block_index: int) -> str:
    return f"{model_prefix}.{block_index}"


def model_prefix_for(model_name: str) -> str:
    """The DHT prefix of a model: its name's last path part, lower-cased, with '.' (the key separator) replaced.

    'meta-llama/Llama-3.2-1B' -> 'llama-3-2-1b'; '/models/tiny-llama/' -> 'tiny-llama'.
    """
    name = model_name.rstrip("/").rsplit("/", 1)[-1].lower()
    prefix = re.sub(r"[^a-z0-9_-]+", "-", name).strip("-")
    if not prefix:
        raise ValueError(f"cannot derive a model prefix from {model_name!r}; pass one explicitly")
    return prefix


class ServerState(str, enum.Enum):
    JOINING = "joining"  # announced, still loading blocks
    ONLINE = "online"  # serving
    DRAINING = "draining"  # leaving: finishes open sessions, accepts no new ones
    OFFLINE = "offline"  # gone; the record remains until it expires

    @property
    def routable(self) -> bool:
        return self is ServerState.ONLINE


_T = TypeVar("_T")


@functools.cache
def _wire_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """(name, whether it has a default and so is optional on the wire) of each field of dataclass `cls`."""
    return tuple((field.name, field.default is not MISSING) for field in fields(cls))


def _from_wire(cls: type[_T], value: Any, what: str) -> _T:
    """Build dataclass `cls` from a wire dict: unknown keys ignored, missing or ill-typed ones rejected."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a map, got {type(value).__name__}")
    kwargs = {}
    for name, optional in _wire_fields(cls):
        if name not in value:
            if optional:
                continue
            raise ProtocolError(f"{what} lacks field {name!r}")
        kwargs[name] = value[name]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"invalid {what}: {e}") from e


def _check_types(obj: object, **types: type | tuple[type, ...]) -> None:
    for name, expected in types.items():
        value = getattr(obj, name)
        if (isinstance(value, bool) and expected in (int, float, (int, float))) or not isinstance(value, expected):
            raise ValueError(f"{name} must be {expected}, got {type(value).__name__}")


def _check_span(start: int, end: int) -> None:
    if not 0 <= start < end:
        raise ValueError(f"span {start}:{end} must satisfy 0 <= start < end")


def _check_compression(compression: object) -> None:
    if compression not in WIRE_COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(WIRE_COMPRESSIONS)}, got {compression!r}")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What a peer announces for each block it hosts."""

    state: ServerState
    start: int
    end: int
    throughput: float  # tokens per second through the whole hosted span, measured on this peer
    cache_tokens_left: int
    dtype: str
    version: str
    protocol_version: int = PROTOCOL_VERSION
    public_name: str = ""
    inference_max_length: int = 0
    max_batch_size: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", ServerState(self.state))
        _check_types(self, start=int, end=int, throughput=(int, float), cache_tokens_left=int, dtype=str, version=str)
        _check_types(self, protocol_version=int, public_name=str, inference_max_length=int, max_batch_size=int)
        _check_span(self.start, self.end)
        if self.throughput < 0 or self.cache_tokens_left < 0:
            raise ValueError("throughput and cache_tokens_left must be non-negative")

    @property
    def length(self) -> int:
        return self.end - self.start

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["state"] = self.state.value
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> ServerInfo:
        return _from_wire(cls, value, "server record")


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A model the swarm serves, so clients and monitors can discover it."""

    name: str  # what to pass to from_pretrained / swarm-peer
    num_blocks: int

    def __post_init__(self) -> None:
        _check_types(self, name=str, num_blocks=int)
        if self.num_blocks <= 0:
            raise ValueError("num_blocks must be positive")

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, value: Any) -> ModelRecord:
        return _from_wire(cls, value, "model record")


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The reply to RPC_INFO."""

    version: str
    protocol_version: int
    model: str
    start: int
    end: int
    dtype: str
    hidden_size: int
    cache_tokens_left: int
    inference_max_length: int
    max_batch_size: int

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, value: Any) -> PeerInfo:
        return _from_wire(cls, value, "peer info")


@dataclass(frozen=True, slots=True)
class InferenceOpen:
    """First message of an inference stream: which blocks, and the KV cache to reserve."""

    start: int
    end: int
    max_length: int  # tokens per sequence the session may reach
    batch_size: int
    compression: str = "none"  # how the session's hidden states travel both ways (WIRE_COMPRESSIONS)
    # a random id the client tells the previous span's peer only, which then forwards steps to this session
    # (RPC_PUSH); empty: no step is forwarded to it
    session: str = ""

    def __post_init__(self) -> None:
        _check_types(self, start=int, end=int, max_length=int, batch_size=int, session=str)
        _check_span(self.start, self.end)
        _check_compression(self.compression)
        if self.max_length <= 0 or self.batch_size <= 0:
            raise ValueError("max_length and batch_size must be positive")
        if len(self.session) > MAX_SESSION_ID_CHARS:
            raise ValueError(f"session id longer than {MAX_SESSION_ID_CHARS} characters")

    @property
    def cache_tokens(self) -> int:
        return self.max_length * self.batch_size

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, value: Any) -> InferenceOpen:
        return _from_wire(cls, value, "inference open")


@dataclass(frozen=True, slots=True)
class ForwardTarget:
    """Where a peer sends a step's output on, besides answering it: the next span's peer, the client's session
    there (`InferenceOpen.session`), the number the step has in that session, and how long the sending peer may
    wait for that peer to take it before it tells the client that the push failed (well within the client's own
    timeout, so that the client can still send the step itself and find a hung next peer as such)."""

    peer_id: str
    session: str
    step: int
    timeout: float
    dtype: str = ""  # the next peer's compute dtype: a wider output is narrowed to it before it is sent

    def __post_init__(self) -> None:
        _check_types(self, peer_id=str, session=str, step=int, timeout=(int, float), dtype=str)
        if not self.session or self.step < 0:
            raise ValueError("a forward target needs a session id and a step number >= 0")
        if not 0 < self.timeout <= MAX_FORWARD_TIMEOUT:
            raise ValueError(f"a forward timeout must be within (0, {MAX_FORWARD_TIMEOUT}] seconds")

    def to_wire(self) -> dict[str, Any]:  # not `asdict`, which copies deeply: one of these goes with every step
        return {
            "peer_id": self.peer_id, "session": self.session, "step": self.step, "timeout": self.timeout,
            "dtype": self.dtype,
        }  # fmt: skip

    @classmethod
    def from_wire(cls, value: Any) -> ForwardTarget:
        return _from_wire(cls, value, "forward target")


@dataclass(frozen=True, slots=True)
class InferenceStep:
    """One step of an inference stream: the hidden states it carries start at token `position`.

    `step` numbers the session's steps from 0 (-1: unnumbered). A numbered step the session has already run is
    dropped without a reply: a step can reach a peer twice, forwarded by the previous span's peer and sent by the
    client when it was told the forwarding failed."""

    position: int
    step: int = -1
    # the spans after this one that get the step from their previous span's peer (RPC_PUSH), in route order: this
    # peer sends its output on to the first, with the rest
    forward_to: tuple[ForwardTarget, ...] = ()

    def __post_init__(self) -> None:
        _check_types(self, position=int, step=int)
        if self.position < 0:
            raise ValueError("position must be non-negative")
        object.__setattr__(self, "forward_to", _forward_targets(self.forward_to))

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"position": self.position, "step": self.step}
        if self.forward_to:
            wire["forward_to"] = [target.to_wire() for target in self.forward_to]
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> InferenceStep:
        return _from_wire(cls, value, "inference step")


def _forward_targets(value: Any) -> tuple[ForwardTarget, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_FORWARD_TARGETS:
        raise ValueError(f"forward_to must be a list of at most {MAX_FORWARD_TARGETS} forward targets")
    return tuple(t if isinstance(t, ForwardTarget) else ForwardTarget.from_wire(t) for t in value)


@dataclass(frozen=True, slots=True)
class ForwardedStep:
    """Metadata of RPC_PUSH: a step of session `session` that the previous span's peer sends on; the session reads
    it as an `InferenceStep` (the same keys)."""

    session: str
    position: int
    step: int
    forward_to: tuple[ForwardTarget, ...] = ()  # where the receiving peer sends its own output on

    def __post_init__(self) -> None:
        _check_types(self, session=str, position=int, step=int)
        if not self.session or self.position < 0 or self.step < 0:
            raise ValueError("a forwarded step needs a session id, a position >= 0 and a step number >= 0")
        object.__setattr__(self, "forward_to", _forward_targets(self.forward_to))

    def to_wire(self) -> dict[str, Any]:
        return {
            "session": self.session, "position": self.position, "step": self.step,
            "forward_to": [target.to_wire() for target in self.forward_to],
        }  # fmt: skip

    @classmethod
    def from_wire(cls, value: Any) -> ForwardedStep:
        return _from_wire(cls, value, "forwarded step")


@dataclass(frozen=True, slots=True)
class SpanRequest:
    """Metadata of a stateless forward or backward call: which of the peer's blocks to run."""

    start: int
    end: int
    compression: str = "none"  # how hidden states and their gradients travel both ways (WIRE_COMPRESSIONS)

    def __post_init__(self) -> None:
        _check_types(self, start=int, end=int)
        _check_span(self.start, self.end)
        _check_compression(self.compression)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, value: Any) -> SpanRequest:
        return _from_wire(cls, value, "span request")


@dataclass(frozen=True, slots=True)
class LoraHeader:
    """Which linear layers of each block a request's LoRA tensors adapt, and their scale (alpha / rank)."""

    targets: tuple[str, ...]  # module names inside one block, e.g. "self_attn.q_proj"
    scaling: float

    def __post_init__(self) -> None:
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ValueError("targets must be a non-empty list of module names")
        object.__setattr__(self, "targets", tuple(self.targets))
        if not all(isinstance(target, str) and target for target in self.targets):
            raise ValueError("targets must be module names")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("targets must not repeat")
        _check_types(self, scaling=(int, float))

    def to_wire(self) -> dict[str, Any]:
        return {"targets": list(self.targets), "scaling": float(self.scaling)}

    @classmethod
    def from_wire(cls, value: Any) -> LoraHeader:
        return _from_wire(cls, value, "LoRA header")


class ErrorKind(str, enum.Enum):
    BAD_REQUEST = "bad_request"  # the caller's fault; retrying elsewhere will not help
    CACHE_FULL = "cache_full"  # this peer has no KV-cache room now; another peer may
    UNAVAILABLE = "unavailable"  # this peer is draining or overloaded
    INTERNAL = "internal"  # the peer failed
    UNAUTHORIZED = "unauthorized"  # a private swarm's peer called without the swarm's token (swarm/swarm_key.py)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    kind: ErrorKind
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ErrorKind(self.kind))
        _check_types(self, message=str)

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "message": self.message}

    @classmethod
    def from_wire(cls, value: Any) -> ErrorReply:
        return _from_wire(cls, value, "error reply")
