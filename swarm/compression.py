"""Tensor (de)serialisation for the wire, via hivemind's compression, with its numpy 2.4 bug fixed and an 8-bit
codec for activations.

Import compression from here, never from `hivemind.compression` directly, so the fix below is always applied.

hivemind 1.1.12 reads the 8-bit codecs' header with `int(np.frombuffer(buffer, count=1, ...))`. numpy 2.4 no
longer converts a one-element 1-D array to a Python scalar, so UNIFORM_8BIT, QUANTILE_8BIT and BLOCKWISE_8BIT fail
to decode with `TypeError: only 0-dimensional arrays can be converted to Python scalars`. A module global shadows
a builtin, so giving `hivemind.compression.quantization` its own `int` that unwraps arrays fixes all three
without forking hivemind. Assigning it again is harmless, so the fix is idempotent.

Codecs (`CompressionType`): NONE is exact for every dtype, bfloat16 in 2 bytes (`Exact`); FLOAT16 and
MEANSTD_16BIT halve float32 with ~1e-3 error (FLOAT16 refuses bfloat16 input); UNIFORM_8BIT and QUANTILE_8BIT
quarter it but with one scale for the whole tensor they are too lossy for activations. BLOCKWISE_8BIT is
`BlockwiseInt8` below, not hivemind's (which needs `bitsandbytes`): every 64 values get their own scale, so an
outlier costs precision only in its block. `serialize_tensor` and `deserialize_tensor` dispatch to it; hivemind's
averaging never sees it.

Activations between clients and peers (`WIRE_COMPRESSIONS`, chosen by the client) go through
`activation_compression`: "none" exact, "fp16" FLOAT16 for float32 tensors, "8bit" BLOCKWISE_8BIT.

Two harmless torch warnings come from hivemind and are filtered in pyproject.toml for the tests: decoders wrap the
read-only protobuf bytes in tensors ("The given NumPy array is not writable", once per process), and torch 2.13
deprecates the quantized tensors that the UNIFORM_8BIT encoder builds.
"""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import torch
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Quantile8BitQuantization,
    ScaledFloat16Compression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
)
from hivemind.compression import quantization as _quantization
from hivemind.proto.runtime_pb2 import CompressionType, Tensor

from swarm.protocol import WIRE_COMPRESSIONS

__all__ = [
    "AVERAGING_CODECS",
    "CompressionType",
    "Tensor",
    "activation_compression",
    "averaging_codec",
    "deserialize_tensor",
    "in_compute_dtype",
    "serialize_tensor",
]

AVERAGING_CODECS = ("none", "fp16", "8bit")  # names of `averaging_codec`
SMALL_TENSOR_ELEMENTS = 2**16  # "8bit" sends tensors up to this size in fp16: quantizing them saves little
INT8_BLOCK = 64  # values per scale of BlockwiseInt8: 4 bytes of scale per 64 bytes of values


def _int_accepting_one_element_arrays(value: Any, *args: Any) -> int:
    """`int()` as numpy < 2.4 let hivemind use it: a one-element array converts to its only element."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return builtins.int(value, *args)


_quantization.int = _int_accepting_one_element_arrays  # shadows the builtin inside that module only


class Exact(NoCompression):
    """NONE, with bfloat16 sent as its own 2 bytes per value: hivemind sends it as float32 unless the environment
    sets USE_LEGACY_BFLOAT16=0, doubling the traffic of every bfloat16 peer. Both forms decode the same (told apart
    by the buffer's length). Written out here rather than through `NoCompression`: every message of an inference
    session carries a tensor each way, and this takes about half the time (9 against 16 microseconds to encode a
    512-value hidden state on this project's machine, 7 against 13 to decode it)."""

    def compress(
        self, tensor: torch.Tensor, info: CompressionInfo | None = None, allow_inplace: bool = False
    ) -> Tensor:
        raw = tensor.detach()
        if raw.dtype == torch.bfloat16:
            raw = raw.view(torch.int16)
        return Tensor(
            compression=self.compression_type,
            buffer=raw.numpy().tobytes(),
            size=tensor.shape,
            dtype=str(tensor.dtype).removeprefix("torch."),
            requires_grad=tensor.requires_grad,
        )

    def extract(self, serialized_tensor: Tensor) -> torch.Tensor:
        dtype = _EXACT_DTYPES.get(serialized_tensor.dtype)
        if dtype is None:
            raise ValueError(f"unknown dtype {serialized_tensor.dtype!r}")
        shape = torch.Size(serialized_tensor.size)
        buffer = serialized_tensor.buffer
        if dtype == torch.bfloat16:
            legacy = shape.numel() > 0 and len(buffer) == 4 * shape.numel()  # hivemind's float32 form
            values = _from_bytes(buffer, torch.float32 if legacy else torch.int16)
            values = values.to(dtype) if legacy else values.view(dtype)
        else:
            values = _from_bytes(buffer, dtype)
        return values.reshape(shape)


# the dtypes a NONE tensor may name: torch's own, by the names `str(dtype)` gives them
_EXACT_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}  # fmt: skip


def _from_bytes(buffer: bytes, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor of `dtype` over a writable copy of `buffer` (the caller may change it in place)."""
    if not buffer:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(buffer), dtype=dtype)


class BlockwiseInt8(CompressionBase):
    """Floating-point values as int8 in blocks of INT8_BLOCK, each block scaled by its largest magnitude / 127.

    The buffer holds the int8 values (padded to whole blocks), then one float32 scale per block; `size` and
    `dtype` are the original's. Relative error on activations is ~0.5% (tests/unit/test_compression.py)."""

    compression_type = CompressionType.BLOCKWISE_8BIT

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> Tensor:
        if not tensor.is_floating_point():
            raise ValueError(f"{type(self).__name__} compresses floating-point tensors, got {tensor.dtype}")
        flat = tensor.detach().reshape(-1).float()
        blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % INT8_BLOCK)).view(-1, INT8_BLOCK)
        scales = blocks.abs().amax(dim=1) / 127
        values = torch.round(blocks / scales.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1))
        return Tensor(
            compression=self.compression_type,
            buffer=values.to(torch.int8).numpy().tobytes() + scales.numpy().tobytes(),
            size=tensor.shape,
            dtype=str(tensor.dtype).removeprefix("torch."),
            requires_grad=tensor.requires_grad,
        )

    def extract(self, serialized_tensor: Tensor) -> torch.Tensor:
        dtype = getattr(torch, serialized_tensor.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"8-bit tensor of unknown or non-float dtype {serialized_tensor.dtype!r}")
        shape = torch.Size(serialized_tensor.size)
        num_blocks = -(-shape.numel() // INT8_BLOCK)
        buffer = serialized_tensor.buffer
        if len(buffer) != num_blocks * (INT8_BLOCK + 4):
            raise ValueError(f"8-bit tensor of shape {list(shape)} needs {num_blocks * (INT8_BLOCK + 4)} bytes")
        values = torch.frombuffer(bytearray(buffer[: num_blocks * INT8_BLOCK]), dtype=torch.int8)
        scales = torch.frombuffer(bytearray(buffer[num_blocks * INT8_BLOCK :]), dtype=torch.float32)
        restored = values.view(num_blocks, INT8_BLOCK).float() * scales.unsqueeze(1)
        return restored.view(-1)[: shape.numel()].view(shape).to(dtype)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return (INT8_BLOCK + 4) / INT8_BLOCK / torch.finfo(info.descriptor.dtype).bits * 8


_EXACT = Exact()
_CODECS: dict[int, CompressionBase] = {
    codec.compression_type: codec
    for codec in (
        _EXACT,
        Float16Compression(),
        ScaledFloat16Compression(),
        Quantile8BitQuantization(),
        Uniform8BitQuantization(),
        BlockwiseInt8(),
    )
}


def serialize_tensor(tensor: torch.Tensor, compression: CompressionType.ValueType = CompressionType.NONE) -> Tensor:
    """`tensor` (on any device) as a `runtime_pb2.Tensor` message, compressed with `compression`."""
    tensor = tensor.detach().cpu().requires_grad_(tensor.requires_grad)
    if compression == CompressionType.NONE:  # needs no CompressionInfo, the costlier half of the work
        return _EXACT.compress(tensor)
    return _CODECS[compression].compress(tensor, CompressionInfo.from_tensor(tensor))


def deserialize_tensor(proto: Tensor) -> torch.Tensor:
    """The tensor in a `runtime_pb2.Tensor` message, decompressed to its original dtype."""
    codec = _CODECS.get(proto.compression)
    if codec is None:
        raise ValueError(f"unknown compression {proto.compression}")
    return codec.extract(proto).requires_grad_(proto.requires_grad)


def activation_compression(name: str, tensor: torch.Tensor) -> CompressionType.ValueType:
    """How hidden states (or their gradients) `tensor` travel under the wire compression `name`
    (WIRE_COMPRESSIONS): "fp16" leaves tensors already in 16 bits as they are."""
    if name not in WIRE_COMPRESSIONS:
        raise ValueError(f"wire compression must be one of {', '.join(WIRE_COMPRESSIONS)}, got {name!r}")
    if name == "none" or not tensor.is_floating_point():
        return CompressionType.NONE
    if name == "fp16":
        return CompressionType.FLOAT16 if tensor.element_size() > 2 else CompressionType.NONE
    return CompressionType.BLOCKWISE_8BIT


def in_compute_dtype(tensor: torch.Tensor, compute_dtype: str) -> torch.Tensor:
    """`tensor` narrowed to a peer's announced compute dtype when that is a narrower float: the peer casts its
    inputs to that dtype first thing, so casting here gives the same result and sends half the bytes."""
    dtype = getattr(torch, compute_dtype, None)
    if (
        isinstance(dtype, torch.dtype)
        and dtype.is_floating_point
        and tensor.is_floating_point()
        and dtype.itemsize < tensor.element_size()
    ):
        return tensor.to(dtype)
    return tensor


def averaging_codec(name: str) -> CompressionBase:
    """The codec for averaging traffic (gradients, parameters) by name: "none" (exact), "fp16" (half the bytes,
    ~1e-3 relative error) or "8bit" (a quarter: uniform 8-bit quantization, small tensors in fp16)."""
    if name == "none":
        return NoCompression()
    if name == "fp16":
        return Float16Compression()
    if name == "8bit":
        return SizeAdaptiveCompression(
            threshold=SMALL_TENSOR_ELEMENTS + 1, less=Float16Compression(), greater_equal=Uniform8BitQuantization()
        )
    raise ValueError(f"unknown averaging compression {name!r}; choose one of {', '.join(AVERAGING_CODECS)}")
