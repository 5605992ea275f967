"""Every codec round-trips tensors through swarm.compression (hivemind's 8-bit ones despite numpy 2.4), and
activations travel under the wire compression a client chooses."""

from __future__ import annotations

import importlib

import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

import swarm.compression
from swarm import messages
from swarm.client._sync import run_sync
from swarm.compression import (
    CompressionType,
    activation_compression,
    deserialize_tensor,
    in_compute_dtype,
    serialize_tensor,
)
from swarm.protocol import STREAM_CHUNK_BYTES

# codec -> the largest relative L2 error allowed on standard normal values, loosely above what was measured
RELATIVE_ERROR = {
    CompressionType.FLOAT16: 1e-2,  # measured 2e-4
    CompressionType.MEANSTD_16BIT: 1e-2,  # measured 2e-4
    CompressionType.UNIFORM_8BIT: 0.1,  # measured 0.015-0.022
    CompressionType.QUANTILE_8BIT: 0.1,  # measured 0.025-0.027
    CompressionType.BLOCKWISE_8BIT: 0.02,  # measured 0.0059 (swarm's BlockwiseInt8)
}


def activations(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(seed))


def round_trip(tensor: torch.Tensor, compression: CompressionType.ValueType) -> torch.Tensor:
    proto = serialize_tensor(tensor, compression)
    # through bytes, as on the wire
    return deserialize_tensor(type(proto).FromString(proto.SerializeToString()))


def test_every_hivemind_codec_is_covered() -> None:
    assert set(CompressionType.values()) == {CompressionType.NONE, *RELATIVE_ERROR}


def test_no_compression_round_trips_float32_exactly() -> None:
    tensor = activations()
    assert torch.equal(round_trip(tensor, CompressionType.NONE), tensor)


def test_no_compression_round_trips_bfloat16_exactly() -> None:
    tensor = activations().bfloat16()
    restored = round_trip(tensor, CompressionType.NONE)
    assert restored.dtype == torch.bfloat16
    assert torch.equal(restored, tensor)


@pytest.mark.parametrize(
    "compression",
    [
        CompressionType.FLOAT16,
        CompressionType.MEANSTD_16BIT,
        CompressionType.UNIFORM_8BIT,
        CompressionType.QUANTILE_8BIT,
        CompressionType.BLOCKWISE_8BIT,
    ],
    ids=CompressionType.Name,
)
def test_lossy_codec_keeps_shape_dtype_and_bounds_the_error(compression: CompressionType.ValueType) -> None:
    tensor = activations()
    proto = serialize_tensor(tensor, compression)
    assert proto.compression == compression
    restored = round_trip(tensor, compression)
    assert (restored.shape, restored.dtype) == (tensor.shape, tensor.dtype)
    assert (restored - tensor).norm() / tensor.norm() < RELATIVE_ERROR[compression]


def test_numpy_fix_survives_reimport() -> None:
    importlib.reload(swarm.compression)
    tensor = activations(seed=1)
    restored = round_trip(tensor, CompressionType.UNIFORM_8BIT)
    assert (restored - tensor).norm() / tensor.norm() < RELATIVE_ERROR[CompressionType.UNIFORM_8BIT]


def test_blockwise_int8_confines_an_outlier_to_its_block() -> None:
    """One huge value (as LLM activations have in a few channels) costs precision only in its block of 64."""
    tensor = activations(seed=2)
    tensor[0, 0, 3] = 1000.0
    restored = round_trip(tensor, CompressionType.BLOCKWISE_8BIT)
    rest = slice(64, None)
    flat, flat_restored = tensor.view(-1)[rest], restored.view(-1)[rest]
    assert (flat_restored - flat).norm() / flat.norm() < RELATIVE_ERROR[CompressionType.BLOCKWISE_8BIT]
    assert restored[0, 0, 3] == pytest.approx(1000.0, rel=1e-3)


def test_blockwise_int8_keeps_bfloat16_and_odd_sizes() -> None:
    tensor = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(3)).bfloat16()  # 105: not whole blocks
    restored = round_trip(tensor, CompressionType.BLOCKWISE_8BIT)
    assert (restored.shape, restored.dtype) == (tensor.shape, torch.bfloat16)
    assert (restored.float() - tensor.float()).norm() / tensor.float().norm() < 0.02


def test_blockwise_int8_refuses_a_truncated_buffer() -> None:
    proto = serialize_tensor(activations(), CompressionType.BLOCKWISE_8BIT)
    proto.buffer = proto.buffer[:-1]
    with pytest.raises(ValueError, match="needs"):
        deserialize_tensor(proto)


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("none", torch.float32, CompressionType.NONE),
        ("fp16", torch.float32, CompressionType.FLOAT16),
        ("fp16", torch.bfloat16, CompressionType.NONE),  # already 16 bits: fp16 would only lose range
        ("8bit", torch.float32, CompressionType.BLOCKWISE_8BIT),
        ("8bit", torch.bfloat16, CompressionType.BLOCKWISE_8BIT),
        ("8bit", torch.int64, CompressionType.NONE),
    ],
)
def test_activation_compression_by_wire_setting_and_dtype(name: str, dtype: torch.dtype, expected: int) -> None:
    assert activation_compression(name, torch.zeros(2, dtype=dtype)) == expected


def test_activation_compression_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="none, fp16, 8bit"):
        activation_compression("4bit", torch.zeros(2))


def test_in_compute_dtype_narrows_only_to_a_narrower_float() -> None:
    tensor = activations()
    assert in_compute_dtype(tensor, "bfloat16").dtype == torch.bfloat16
    assert torch.equal(in_compute_dtype(tensor, "bfloat16"), tensor.to(torch.bfloat16))  # what the peer would do
    assert in_compute_dtype(tensor, "float32") is tensor
    assert in_compute_dtype(tensor.bfloat16(), "float32").dtype == torch.bfloat16  # never widened
    assert in_compute_dtype(tensor, "not-a-dtype") is tensor


def test_messages_compress_activations_only() -> None:
    """Hidden states go 8-bit; the LoRA tensor after them stays exact."""
    hidden, lora = activations(), torch.randn(4, 64)
    message = messages.request([hidden, lora], {"start": 0}, compression="8bit", activations=1)
    assert [t.compression for t in message.tensors] == [CompressionType.BLOCKWISE_8BIT, CompressionType.NONE]
    restored_hidden, restored_lora = messages.tensors_of(message)
    assert torch.equal(restored_lora, lora)
    assert (restored_hidden - hidden).norm() / hidden.norm() < RELATIVE_ERROR[CompressionType.BLOCKWISE_8BIT]


def test_chunked_messages_round_trip_compressed_tensors() -> None:
    """A payload several chunks long, 8-bit hidden states first, reassembled with its metadata."""
    hidden = torch.randn(2, 4096, 512, generator=torch.Generator().manual_seed(4))  # 16 MiB in float32
    grads = torch.randn(2, 4096, 512, generator=torch.Generator().manual_seed(5))
    chunks = messages.to_chunked_messages(
        runtime_pb2.ExpertRequest, [hidden, grads], {"start": 1}, compression="fp16", activations=1
    )
    assert len(chunks) > 2 and all(c.ByteSize() <= STREAM_CHUNK_BYTES + 1024 for c in chunks)
    metadata, (restored_hidden, restored_grads) = run_sync(messages.read_chunked_messages(as_aiter(*chunks)))
    assert metadata == {"start": 1}
    assert torch.equal(restored_grads, grads)
    torch.testing.assert_close(restored_hidden, hidden, atol=1e-2, rtol=1e-3)


def test_bfloat16_travels_in_two_bytes_per_value() -> None:
    tensor = activations().bfloat16()
    assert len(serialize_tensor(tensor, CompressionType.NONE).buffer) == 2 * tensor.numel()
