"""How much memory a piece of work really takes, for sizing the KV cache after the profiling pass.

`getrusage().ru_maxrss` is the process-lifetime peak: after loading and prepacking weights (whose temporary
copies are freed again) it may already sit above anything the profiling pass reaches, and "peak after minus
peak before" then reads ~0 and the KV cache is sized too large. Instead, the kernel's peak-RSS mark (VmHWM) is
reset just before the work (`/proc/self/clear_refs` = 5, Linux 4.0+), so the peak read after it is the peak of
the work alone; the work's cost is that peak minus the resident set just before it. Where the mark cannot be
reset (not Linux, or no permission), a thread samples the resident set while the work runs (a lower bound,
but one that never reads an earlier peak).
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_SAMPLE_INTERVAL_S = 0.002


def current_rss_bytes() -> int:
    """The process's resident set now (/proc/self/statm; 0 where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def _peak_rss_bytes() -> int | None:
    """VmHWM: the resident set's peak since the process started or since the mark was last reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak_bytes(work: Callable[[], T]) -> tuple[T, int]:
    """Run `work()`; return its result and how far the resident set rose above its level at the start."""
    before = current_rss_bytes()
    if _reset_peak_rss() and _peak_rss_bytes() is not None:
        result = work()
        return result, max(0, _peak_rss_bytes() - before)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(_SAMPLE_INTERVAL_S):
            peak = max(peak, current_rss_bytes())

    sampler = threading.Thread(target=sample, name="fovea-rss-sampler", daemon=True)
    sampler.start()
    try:
        result = work()
        peak = max(peak, current_rss_bytes())  # what the work still holds at its end
    finally:
        done.set()
        sampler.join()
    return result, max(0, peak - before)


def trim_free_memory() -> None:
    """Hand the allocator's free pages back to the kernel (glibc's `malloc_trim`; nothing elsewhere), so that
    the measurement starts from what is really held: memory earlier work freed but malloc kept would otherwise be
    reused by the measured step, unseen."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
_LAZY_MIN_BYTES = 1 << 20


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of zeros whose pages the kernel maps, zero-filled, on first write (a private anonymous
    mapping): allocating a large KV pool costs no time and no resident memory until its blocks are used
    (`torch.zeros` writes every byte: seconds for a few GB, at start-up, on memory most runs never touch).
    The mapping goes with the last tensor viewing it."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _LAZY_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype).view(shape)


_MADV_POPULATE_READ = 22  # Linux 5.14+; not in Python 3.11's mmap module


def make_resident(tensors: list[torch.Tensor]) -> None:
    """Map every page of `tensors` (views of a file mapping: the weights that run from the checkpoint's page
    cache) into the process now, reading from the file what the page cache lacks (madvise MADV_POPULATE_READ;
    a read of one byte per page where the kernel has no such advice). Why at start-up: the profiling pass's peak
    would otherwise count the pages its layers fault in (they are budgeted on their own,
    `ModelRunner.determine_num_kv_blocks`), and the first decode step would take ~1.3 M page faults (5 GB of
    4 KiB pages), from disk if the cache lost them. Cost: ~0.1 CPU-s per 2 GB already in the page cache (AMD
    EPYC VM, busy, 2026-12-07 16:58 UTC)."""
    global _madvise
    if _madvise is None:
        try:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
            _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _madvise = False
    for tensor in tensors:
        start = tensor.data_ptr() // _PAGE_BYTES * _PAGE_BYTES
        length = tensor.data_ptr() + tensor.nbytes - start
        if not (_madvise and _madvise(start, length, _MADV_POPULATE_READ) == 0):
            flat = tensor.reshape(-1).view(torch.uint8) if tensor.is_contiguous() else tensor
            if flat.dim() == 1:
                flat[::_PAGE_BYTES].sum()
            else:
                tensor.sum()


_madvise = None
