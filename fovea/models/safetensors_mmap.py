"""A safetensors file read through a memory map, one tensor at a time, handing each page back once read.

Why not `safetensors.safe_open`: its tensors are views of a mapping that lives as long as the file is open, so
every page read stays in the process's resident set (RSS) until the end. Loading a checkpoint into packed
weights then holds two copies (the mapped file and the weights made from it): 15.7 GB for BLIP-2 OPT-2.7b's
7.7 GB. Here `release(name)` drops a tensor's pages from the mapping (madvise MADV_DONTNEED: the file's pages stay
in the page cache, only this process's mapping of them goes), so RSS holds the weights built so far plus the
tensor being read.

`holds(tensor)` says whether a tensor still lives in the mapping, so a loader can lend a file's pages to a layer
that repacks them (one pass over the weight instead of a copy and then a repack) and copy out whatever is kept as
it is. The mapping is read-only (as safetensors' own; a private writable mapping would be charged against the
commit limit in full): a tensor from `get` must never be written to, which would kill the process (SIGSEGV).

The format (https://github.com/huggingface/safetensors): an unsigned little-endian 64-bit header size N, N
bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data,
offsets relative to its start, little-endian, row-major.
"""
from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


class SafetensorsFile:
    """`keys()`, `get(name)` (a view of the mapping: copy it, or pack from it, do not keep it), `holds(tensor)`,
    `release(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ValueError(f"{self.path.name}: not a safetensors file ({size} bytes)")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"{self.path.name}: not a safetensors file (header of {header_bytes} bytes)")
            header = json.loads(f.read(header_bytes))
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + header_bytes else None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_bytes
        self._size = size
        self._base_ptr = 0
        if self._mmap is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                self._base_ptr = torch.frombuffer(self._mmap, dtype=torch.uint8, count=1).data_ptr()
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"{self.path.name}: tensor {name!r} has dtype {info.get('dtype')!r}; "
                                 f"supported: {', '.join(DTYPES)}")
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            numel = 1
            for dim in shape:
                numel *= dim
            if end - begin != numel * dtype.itemsize or begin < 0 or self._data_start + end > size:
                raise ValueError(f"{self.path.name}: tensor {name!r} ({info['dtype']} {list(shape)}) has data "
                                 f"offsets {begin}..{end} that do not fit it or the file ({size} bytes)")
            self._entries[name] = (dtype, shape, self._data_start + begin, numel)

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, offset, numel = self._entries[name]
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # the mapping is read-only; the tensor is only ever read from
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(self._mmap, dtype=dtype, count=numel, offset=offset).view(shape)

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor`'s data lies in this file's mapping (opaque tensors, e.g. oneDNN's, never do)."""
        if self._mmap is None or tensor.layout != torch.strided or tensor.numel() == 0:
            return False
        return self._base_ptr <= tensor.data_ptr() < self._base_ptr + self._size

    def release(self, name: str) -> None:
        """Drop the whole pages of `name` from this process's mapping (re-read from the file if needed again)."""
        dtype, _, offset, numel = self._entries[name]
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (offset + numel * dtype.itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds a view: the mapping goes with the last one
                pass
            self._mmap = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
