"""Read (and, for tests and exporters, write) the safetensors format with numpy alone.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names
to ``dtype``/``shape``/``data_offsets``, then raw little-endian data. Parsing it here
avoids a dependency for ~40 lines, and lets us read BF16, which numpy has no dtype for:
a bfloat16 is the top half of a float32, so shifting its bits left by 16 is exact.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from edgespec.errors import UserError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name → ``{"dtype", "shape", "data_offsets"}`` (the ``__metadata__`` dropped)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise UserError(f"{path.name}: tensor {name} is {info['dtype']}; expected F32/F16/BF16")
    return header


def read_safetensors_tensors(path: Path, header: dict[str, dict]) -> dict[str, np.ndarray]:
    """Every tensor of ``path`` as a float32 array."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = data[begin:end].view(_DTYPES[info["dtype"]])
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.array(raw, dtype=np.float32).reshape(info["shape"])
    return out


def to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the raw 16-bit patterns."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Write arrays as a safetensors file in ``dtype`` (F32, F16 or BF16)."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        if dtype == "BF16":
            blob = to_bf16_bits(array).astype("<u2").tobytes()
        else:
            blob = np.ascontiguousarray(array, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
            blob = blob.tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
