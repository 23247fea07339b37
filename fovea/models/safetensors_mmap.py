"""A safetensors file read through a memory map, one tensor at a time, handing each page back once read.

Why not `safetensors.safe_open`: its tensors are views of a mapping that lives as long as the file is open, so
every page read stays in the process's resident set (RSS) until the end. Loading a checkpoint into packed
weights then holds two copies (the mapped file and the weights made from it): 15.7 GB for BLIP-2 OPT-2.7b's
7.7 GB. Here `release(name)` drops a tensor's pages from the mapping (madvise MADV_DONTNEED: the file's pages stay
in the page cache, only this process's mapping of them goes), so RSS holds the weights built so far plus the
tensor being read.

`holds(tensor)` says whether a tensor still lives in the mapping, so a loader can lend a file's pages to a layer
that repacks them (one pass over the weight instead of a copy and then a repack), copy out whatever is kept as it
is, or leave in the file what a layer runs from in place (`fovea.layers.linear_methods.BF16RowsLinearMethod`).

Copy-on-write: the file is mapped private and writable (`mmap.ACCESS_COPY`, MAP_PRIVATE): reading costs what a
read-only mapping costs (the page cache's own pages are mapped), and a write into a tensor from `get` (a weight
perturbed in place, `load_state_dict` into a model that runs from the file) copies that 4 KiB page into memory
of the process's own instead of killing it (SIGSEGV, as a read-only mapping does); the file never changes.
What it costs: the kernel charges a private writable mapping's whole size to the commit count (Committed_AS).
Under the default heuristic overcommit (/proc/sys/vm/overcommit_memory = 0, this project's machines) that
changes nothing; under strict overcommit (2) a large file may not fit under CommitLimit, and the file is then
mapped read-only (`is_copy_on_write` False): its tensors are only lent while loading, never kept.

Lifetime: the mapping lives as long as the `mmap` object, and every tensor from `get` keeps that object alive
(`torch.frombuffer` holds a reference to it, but no buffer export: `mmap.close()` would unmap the pages under
live tensors). `close()` therefore only drops this object's reference: the pages are unmapped when the last view
of them goes, never before. `lies_in_a_file(tensor)` says whether a tensor is a view of any live mapping.

The format (https://github.com/huggingface/safetensors): an unsigned little-endian 64-bit header size N, N
bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data,
offsets relative to its start, little-endian, row-major.
"""
from __future__ import annotations

import json
import mmap
import struct
import warnings
import weakref
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit

_MAPPINGS: weakref.WeakValueDictionary[int, mmap.mmap] = weakref.WeakValueDictionary()
"""Every live mapping by its first byte's address; an entry goes with its mapping (the last view of it)."""


def lies_in_a_file(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s data lies in a live safetensors mapping (one opened here, whether closed or not)."""
    if tensor.layout != torch.strided or tensor.numel() == 0 or tensor.device.type != "cpu":
        return False
    ptr = tensor.data_ptr()
    return any(base <= ptr < base + len(mapping) for base, mapping in list(_MAPPINGS.items()))


def track_mapping(mapping: mmap.mmap, base_ptr: int) -> None:
    """Count another file mapping (e.g. `fovea.models.packed_cache`'s) in `lies_in_a_file`, while it lives:
    weights that run from a file's pages are kept out of the KV cache's budget and mapped in after loading
    (`fovea.worker.model_runner`), wherever the file comes from."""
    _MAPPINGS[base_ptr] = mapping


def _map(f) -> tuple[mmap.mmap, bool]:
    """The file mapped copy-on-write, else (strict overcommit refusing the commit charge) read-only."""
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), True
    except OSError:  # ENOMEM: overcommit_memory = 2 and the file does not fit under CommitLimit
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), False


class SafetensorsFile:
    """`keys()`, `get(name)` (a view of the mapping, copy-on-write unless `is_copy_on_write` is False),
    `holds(tensor)`, `release(name)`."""

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
            self._mmap, self.is_copy_on_write = _map(f) if size > 8 + header_bytes else (None, False)
        header.pop("__metadata__", None)
        self._data_start = 8 + header_bytes
        self._size = size
        self._base_ptr = 0
        if self._mmap is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                self._base_ptr = torch.frombuffer(self._mmap, dtype=torch.uint8, count=1).data_ptr()
            _MAPPINGS[self._base_ptr] = self._mmap
        self._mapping = weakref.ref(self._mmap) if self._mmap is not None else lambda: None
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

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        dtype, _, _, numel = self._entries[name]
        return numel * dtype.itemsize

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, offset, numel = self._entries[name]
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # a read-only mapping (strict overcommit): its tensors are only read
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(self._mmap, dtype=dtype, count=numel, offset=offset).view(shape)

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor`'s data lies in this file's mapping, closed or not, while it lives (opaque tensors,
        e.g. oneDNN's, never do)."""
        if self._mapping() is None or tensor.layout != torch.strided or tensor.numel() == 0:
            return False
        return self._base_ptr <= tensor.data_ptr() < self._base_ptr + self._size

    def release(self, name: str) -> None:
        """Drop the whole pages of `name` from this process's mapping (re-read from the file if needed again; a
        page written since is dropped too: only for tensors no one keeps)."""
        dtype, _, offset, numel = self._entries[name]
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (offset + numel * dtype.itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start and self._mmap is not None:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Drop this object's hold on the mapping; it is unmapped once no tensor views it (see the module
        docstring: `mmap.close()` would unmap it under a kept weight)."""
        self._mmap = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
