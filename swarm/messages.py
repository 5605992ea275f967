"""Encoding of RPC messages, shared by peer and client: tensors plus msgpack metadata in hivemind protobufs.

Small payloads travel as one message; payloads above hivemind's unary cap travel as a stream of chunks
(`to_chunked_messages` / `read_chunked_messages`), with the metadata in the first chunk.

The first `activations` tensors of a message are hidden states or their gradients and travel under the wire
compression the client chose (`compression`, one of WIRE_COMPRESSIONS); the rest (LoRA tensors, deep prompts and
their gradients) always travel exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, TypeVar

import msgpack
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from swarm.compression import CompressionType, activation_compression, deserialize_tensor, serialize_tensor
from swarm.errors import ProtocolError
from swarm.protocol import STREAM_CHUNK_BYTES, ErrorReply

Message = TypeVar("Message", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)


def pack_metadata(metadata: dict[str, Any]) -> bytes:
    return msgpack.packb(metadata, use_bin_type=True)


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """16 bytes that tell two tensors' contents apart: whoever decodes the same message gets the same digest."""
    digest = hashlib.blake2b(f"{tensor.dtype} {list(tensor.shape)}".encode(), digest_size=16)
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


def as_received(hidden: torch.Tensor, compression: str) -> torch.Tensor:
    """Hidden states as whoever receives them under the wire `compression` decodes them (the same under "none")."""
    if compression == "none":
        return hidden
    return deserialize_tensor(serialized([hidden], compression)[0])


def unpack_metadata(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        metadata = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise ProtocolError(f"metadata is not valid msgpack: {e}") from e
    if not isinstance(metadata, dict):
        raise ProtocolError(f"metadata must be a map, got {type(metadata).__name__}")
    return metadata


def serialized(
    tensors: Sequence[torch.Tensor], compression: str = "none", activations: int = 1
) -> list[runtime_pb2.Tensor]:
    """`tensors` as protobufs: the first `activations` under the wire `compression`, the others exact."""
    return [
        serialize_tensor(t, activation_compression(compression, t) if i < activations else CompressionType.NONE)
        for i, t in enumerate(tensors)
    ]


def request(
    tensors: Sequence[torch.Tensor],
    metadata: dict[str, Any] | None = None,
    compression: str = "none",
    activations: int = 1,
) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(
        tensors=serialized(tensors, compression, activations), metadata=pack_metadata(metadata) if metadata else b""
    )


def response(
    tensors: Sequence[torch.Tensor],
    metadata: dict[str, Any] | None = None,
    compression: str = "none",
    activations: int = 1,
) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(
        tensors=serialized(tensors, compression, activations), metadata=pack_metadata(metadata) if metadata else b""
    )


def error_response(error: ErrorReply) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=pack_metadata({"error": error.to_wire()}))


def error_of(metadata: dict[str, Any]) -> ErrorReply | None:
    """The refusal a reply carries, if any."""
    return ErrorReply.from_wire(metadata["error"]) if "error" in metadata else None


def tensors_of(message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse) -> list[torch.Tensor]:
    try:
        return [deserialize_tensor(t) for t in message.tensors]
    except (ValueError, TypeError, RuntimeError) as e:
        raise ProtocolError(f"malformed tensor: {e}") from e


def payload_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def to_chunked_messages(
    message_type: type[Message],
    tensors: Sequence[torch.Tensor],
    metadata: dict[str, Any] | None = None,
    compression: str = "none",
    activations: int = 1,
) -> list[Message]:
    """Split serialized tensors into chunks of at most STREAM_CHUNK_BYTES; metadata goes in the first message."""
    messages = [
        message_type(tensors=[part])
        for proto in serialized(tensors, compression, activations)
        for part in split_for_streaming(proto, STREAM_CHUNK_BYTES)
    ]
    if not messages:
        messages = [message_type()]
    if metadata:
        messages[0].metadata = pack_metadata(metadata)
    return messages


async def read_chunked_messages(
    messages: AsyncIterator[runtime_pb2.ExpertRequest] | AsyncIterator[runtime_pb2.ExpertResponse],
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Metadata of the first message and the tensors reassembled from all chunks."""
    raw_metadata: bytes | None = None
    tensors: list[list[runtime_pb2.Tensor]] = []  # the chunks of each tensor; a chunk with a dtype starts one
    async for message in messages:
        if raw_metadata is None:
            raw_metadata = message.metadata
        for part in message.tensors:
            if part.dtype or not tensors:
                tensors.append([])
            tensors[-1].append(part)
    metadata = unpack_metadata(raw_metadata or b"")
    try:
        return metadata, [deserialize_tensor(combine_from_streaming(parts)) for parts in tensors]
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        raise ProtocolError(f"malformed tensor stream: {e}") from e
