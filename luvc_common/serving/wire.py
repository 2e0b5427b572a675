"""The one codec for tensors on the wire: a header (dtype name, shape) plus raw little-endian bytes.

Like KServe v2 / Triton raw tensors: nothing is unpickled or torch.load-ed. Received tensors are
checked against a declared schema (dtypes, rank, fixed dims, byte count, finite values) before
anything else touches them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from luvc_common.errors import WireError
from luvc_common.proto import luvc_pb2

WIRE_DTYPES = {"BF16": torch.bfloat16, "FP16": torch.float16, "FP32": torch.float32}
# bf16 has no numpy dtype: it travels as its 16-bit pattern through int16
_NUMPY = {"BF16": ("<i2", torch.int16), "FP16": ("<f2", torch.float16), "FP32": ("<f4", torch.float32)}


@dataclass(frozen=True)
class TensorSchema:
    """What a received tensor must look like."""

    name: str
    """Field name used in error messages."""
    shape: tuple[int | None, ...]
    """Expected shape; None marks a free dimension."""
    dtypes: tuple[str, ...] = tuple(WIRE_DTYPES)
    """Accepted wire dtype names."""


def wire_dtype(name: str) -> str:
    name = name.upper()
    if name not in WIRE_DTYPES:
        raise WireError(f"wire dtype {name!r} is not supported: expected one of {list(WIRE_DTYPES)}")
    return name


def to_wire(tensor: torch.Tensor, dtype: str) -> luvc_pb2.Tensor:
    dtype = wire_dtype(dtype)
    np_dtype, view = _NUMPY[dtype]
    array = tensor.detach().to("cpu", WIRE_DTYPES[dtype]).contiguous().view(view).numpy()
    if sys.byteorder != "little":
        array = array.astype(np_dtype)
    return luvc_pb2.Tensor(dtype=dtype, shape=list(tensor.shape), data=array.tobytes())


def from_wire(msg: luvc_pb2.Tensor, schema: TensorSchema) -> torch.Tensor:
    """Decode and validate; raises WireError naming the field and what was wrong."""
    if msg.dtype not in schema.dtypes:
        raise WireError(f"{schema.name}: dtype {msg.dtype!r} is not one of {list(schema.dtypes)}")
    shape = tuple(msg.shape)
    if len(shape) != len(schema.shape) or any(e is not None and e != s for e, s in zip(schema.shape, shape)):
        expected = tuple("*" if e is None else e for e in schema.shape)
        raise WireError(f"{schema.name}: shape {list(shape)} does not match {list(expected)}")
    if any(s < 0 for s in shape):
        raise WireError(f"{schema.name}: negative dimension in shape {list(shape)}")
    np_dtype, view = _NUMPY[msg.dtype]
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
    if len(msg.data) != expected_bytes:
        raise WireError(f"{schema.name}: {len(msg.data)} bytes, shape {list(shape)} in {msg.dtype} needs {expected_bytes}")
    array = np.frombuffer(msg.data, dtype=np_dtype).astype(np_dtype[1:], copy=True).reshape(shape)
    tensor = torch.from_numpy(array).view(WIRE_DTYPES[msg.dtype]) if view is torch.int16 else torch.from_numpy(array)
    if not bool(torch.isfinite(tensor).all()):
        raise WireError(f"{schema.name}: contains NaN or infinite values")
    return tensor

