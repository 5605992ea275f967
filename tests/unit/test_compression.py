"""Every hivemind codec round-trips tensors through swarm.compression, the 8-bit ones despite numpy 2.4."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

import swarm.compression
from swarm.compression import CompressionType, deserialize_tensor, serialize_tensor

HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None

# codec -> the largest relative L2 error allowed on standard normal values, loosely above what was measured
RELATIVE_ERROR = {
    CompressionType.FLOAT16: 1e-2,  # measured 2e-4
    CompressionType.MEANSTD_16BIT: 1e-2,  # measured 2e-4
    CompressionType.UNIFORM_8BIT: 0.1,  # measured 0.015-0.022
    CompressionType.QUANTILE_8BIT: 0.1,  # measured 0.025-0.027
    CompressionType.BLOCKWISE_8BIT: 0.1,
}
NEEDS_BITSANDBYTES = pytest.mark.skipif(
    not HAS_BITSANDBYTES, reason="BLOCKWISE_8BIT needs bitsandbytes, which is not installed"
)


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
        pytest.param(CompressionType.BLOCKWISE_8BIT, marks=NEEDS_BITSANDBYTES),
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
