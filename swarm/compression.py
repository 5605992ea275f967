"""Tensor (de)serialisation for the wire, via hivemind's compression, with its numpy 2.4 bug fixed.

Import compression from here, never from `hivemind.compression` directly, so the fix below is always applied.

hivemind 1.1.12 reads the 8-bit codecs' header with `int(np.frombuffer(buffer, count=1, ...))`. numpy 2.4 no
longer converts a one-element 1-D array to a Python scalar, so UNIFORM_8BIT, QUANTILE_8BIT and BLOCKWISE_8BIT fail
to decode with `TypeError: only 0-dimensional arrays can be converted to Python scalars`. A module global shadows
a builtin, so giving `hivemind.compression.quantization` its own `int` that unwraps arrays fixes all three
without forking hivemind. Assigning it again is harmless, so the fix is idempotent.

Codecs (`CompressionType`): NONE is exact for every dtype (bfloat16 included); FLOAT16 and MEANSTD_16BIT halve
float32 with ~1e-3 error (FLOAT16 refuses bfloat16 input); the 8-bit ones quarter it but UNIFORM_8BIT and
QUANTILE_8BIT are too lossy for activations; BLOCKWISE_8BIT needs `bitsandbytes`.

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
    Float16Compression,
    NoCompression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.compression import quantization as _quantization
from hivemind.proto.runtime_pb2 import CompressionType, Tensor

__all__ = ["AVERAGING_CODECS", "CompressionType", "Tensor", "averaging_codec", "deserialize_tensor", "serialize_tensor"]

AVERAGING_CODECS = ("none", "fp16", "8bit")  # names of `averaging_codec`
SMALL_TENSOR_ELEMENTS = 2**16  # "8bit" sends tensors up to this size in fp16: quantizing them saves little


def _int_accepting_one_element_arrays(value: Any, *args: Any) -> int:
    """`int()` as numpy < 2.4 let hivemind use it: a one-element array converts to its only element."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return builtins.int(value, *args)


_quantization.int = _int_accepting_one_element_arrays  # shadows the builtin inside that module only


def serialize_tensor(tensor: torch.Tensor, compression: CompressionType.ValueType = CompressionType.NONE) -> Tensor:
    """`tensor` as a `runtime_pb2.Tensor` message, compressed with `compression`."""
    return serialize_torch_tensor(tensor, compression)


def deserialize_tensor(proto: Tensor) -> torch.Tensor:
    """The tensor in a `runtime_pb2.Tensor` message, decompressed to its original dtype."""
    return deserialize_torch_tensor(proto)


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
