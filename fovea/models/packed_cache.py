"""Packed weights kept on disk between starts (`EngineConfig.packed_weights_cache`).

Why: a layer that runs a packed layout (fovea's panels, `fovea.kernels.panels`) needs its weight written once
more in that layout, and on this project's VMs writing fresh memory is what a start costs (BLIP-2 OPT-2.7b: the
7.5 GB of panels took 6-16 s against transformers' 3-4 s for the whole load, which writes nothing: its weights
are views of the mapped checkpoint). Here each layer's panels are packed into a file of their own and run from
that file's pages; the next start of the same checkpoint maps the file instead of packing: its pages are still
in the page cache (no fresh memory, and the kernel's large folios map them 2 MiB at a time, as fast to stream
as anonymous 2 MiB pages), or they are read from disk like the checkpoint itself would be.

Layout: `<root>/<key>/` per checkpoint, `<key>` a digest of the checkpoint directory's real path, each
safetensors file's name, size, modification time and inode, the dtype and `LAYOUT_VERSION`; in it one file per
layer, `<layer name>.<out>x<in>.<dtype>.tp<rank>of<size>.panels`, holding exactly the packed tensor's bytes, and
`meta.json` (which checkpoint). A checkpoint rewritten (new size, time or inode) gets a new key; an entry whose
checkpoint is gone or changed is deleted the next time any checkpoint opens the cache, as are files a process
that died left half written. The key is the files' metadata, not their content (hashing a 7.5 GB checkpoint would
cost more than packing it): a checkpoint rewritten in place with the same size, modification time and inode would
be served from panels of the old weights (`packed_weights_cache="off"`, or deleting the entry, avoids it).

A file is packed under a temporary name through a shared mapping (space reserved first: a full disk means the
layer is packed in memory as before, with one warning), then the layer maps it copy-on-write (a write into a
weight can never reach the file) and a background thread flushes it to disk and only then renames it into place:
a file under its final name is complete on disk, also after a crash. The thread's queue is drained before the
interpreter exits; a start that comes before a file reached its final name (another process starting at the same
moment) packs that layer again, into a file of its own, which the last rename wins. Where the cache lives: `fovea.models.packed_cache.default_root()`.

fovea never changes a file of the cache in place (new files are renamed over old ones, stale entries unlinked,
which leaves a running engine's mapping of them alone); a file truncated by hand under a running engine would
make its next read of the lost pages fail with SIGBUS, as a checkpoint truncated under weights that run from it
in place would.

What is cached: the panels of `avx512-bf16` and `amx` layers (one layout for both kernels, so a cache is valid
on any x86 host); oneDNN's opaque layout and the int8 codes are packed in memory at every start.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import mmap
import os
import queue
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fovea.models.safetensors_mmap import track_mapping
from fovea.models.weights import safetensors_files

logger = logging.getLogger(__name__)

LAYOUT_VERSION = 1
"""Bumped when the panel layout (`fovea.kernels.panels`) or this file format changes: old entries are ignored."""

_TMP = ".tmp-"


def default_root() -> Path:
    """`$FOVEA_CACHE_DIR/packed-weights`, else `$XDG_CACHE_HOME/fovea/packed-weights`, else
    `~/.cache/fovea/packed-weights`."""
    base = os.environ.get("FOVEA_CACHE_DIR")
    if base:
        return Path(base) / "packed-weights"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "fovea" / "packed-weights"


def resolve_root(requested: str | None) -> Path | None:
    """The cache directory `requested` names: "auto" -> `default_root()`, "off" or None -> None, else the path."""
    if requested is None or requested == "off":
        return None
    if requested == "auto":
        return default_root()
    if not requested:
        raise ValueError("packed_weights_cache=''; allowed: 'auto', 'off' or a directory")
    return Path(requested).expanduser()


def open_cache(requested: str | None, model_dir: str | Path, dtype: torch.dtype) -> "PackedWeightsCache | None":
    """The checkpoint's entry of the cache `requested` names (`resolve_root`), or None where it is off or its
    directory cannot be made or written (a warning: the engine then packs in memory, as with "off")."""
    root = resolve_root(requested)
    if root is None:
        return None
    try:
        return PackedWeightsCache.open(root, model_dir, dtype)
    except OSError as e:
        logger.warning("packed weights cache: cannot use %s (%s); packing in memory instead", root, e)
        return None


def checkpoint_key(model_dir: str | Path, dtype: torch.dtype) -> str:
    """The digest naming a checkpoint's entry (see the module docstring)."""
    model_dir = Path(model_dir).resolve()
    files = []
    for path in safetensors_files(model_dir):  # the files the loader reads (ValueError where it would refuse)
        st = path.stat()
        files.append([path.name, st.st_size, st.st_mtime_ns, st.st_ino])
    blob = json.dumps({"layout": LAYOUT_VERSION, "dir": str(model_dir), "files": files, "dtype": str(dtype)})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _map_tensor(fd: int, numel: int, dtype: torch.dtype, access: int, huge_pages: bool) -> torch.Tensor:
    mapping = mmap.mmap(fd, numel * dtype.itemsize, access=access)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        tensor = torch.frombuffer(mapping, dtype=dtype, count=numel)
    track_mapping(mapping, tensor.data_ptr())
    return tensor


class _Flusher:
    """One background thread per process: fdatasync a packed file, then rename it into place."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fd: int, tmp: Path, final: Path) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fovea-packed-cache", daemon=True)
                self._thread.start()
                atexit.register(self.drain)
        self._queue.put((fd, tmp, final))

    def drain(self) -> None:
        """Wait until every file submitted so far is on disk under its final name."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            fd, tmp, final = self._queue.get()
            try:
                os.fdatasync(fd)
                os.rename(tmp, final)
            except OSError as e:
                logger.warning("packed weights cache: could not keep %s (%s)", final.name, e)
                with contextlib.suppress(OSError):
                    tmp.unlink()
            finally:
                os.close(fd)
                self._queue.task_done()


FLUSHER = _Flusher()


@dataclass
class PendingPanels:
    """A layer's panels being packed into a new cache file: write into `tensor`, then `commit()`."""

    tensor: torch.Tensor
    fd: int
    tmp: Path
    final: Path
    huge_pages: bool
    cache: "PackedWeightsCache"

    def commit(self) -> torch.Tensor:
        """The panels as the layer keeps them (a copy-on-write mapping of the file); the file goes to disk and
        into place in the background."""
        numel, dtype = self.tensor.numel(), self.tensor.dtype
        shape = self.tensor.shape
        kept = _map_tensor(self.fd, numel, dtype, mmap.ACCESS_COPY, self.huge_pages).view(shape)
        self.tensor = None  # the shared writable mapping goes with the last reference to it
        FLUSHER.submit(self.fd, self.tmp, self.final)
        self.cache.num_written += 1
        self.cache.bytes_written += numel * dtype.itemsize
        return kept


@dataclass
class PackedWeightsCache:
    """The entry of one checkpoint (`open`): `lookup` maps a layer's panels from it, `create` starts a new file."""

    directory: Path
    num_mapped: int = 0
    bytes_mapped: int = 0
    num_written: int = 0
    bytes_written: int = 0
    _warned: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, root: str | Path, model_dir: str | Path, dtype: torch.dtype) -> "PackedWeightsCache":
        root = Path(root)
        model_dir = Path(model_dir).resolve()
        key = checkpoint_key(model_dir, dtype)
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        prune(root, keep=key)
        directory = root / key
        directory.mkdir(exist_ok=True, mode=0o700)
        meta = directory / "meta.json"
        if not meta.exists():
            tmp = directory / f"meta.json{_TMP}{os.getpid()}"
            tmp.write_text(json.dumps({"model": str(model_dir), "dtype": str(dtype), "layout": LAYOUT_VERSION}))
            tmp.rename(meta)
        return cls(directory)

    def path(self, layer_name: str, shape: tuple[int, int], dtype: torch.dtype, tp: tuple[int, int]) -> Path:
        out_features, in_features = shape
        dtype_name = str(dtype).removeprefix("torch.")
        return self.directory / f"{layer_name}.{out_features}x{in_features}.{dtype_name}.tp{tp[0]}of{tp[1]}.panels"

    def lookup(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype, huge_pages: bool) -> torch.Tensor | None:
        """The panels in `path` (copy-on-write), or None where there is no complete file of exactly their size."""
        numel = math.prod(shape)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size != numel * dtype.itemsize:
                return None
            tensor = _map_tensor(fd, numel, dtype, mmap.ACCESS_COPY, huge_pages).view(shape)
        finally:
            os.close(fd)
        self.num_mapped += 1
        self.bytes_mapped += numel * dtype.itemsize
        return tensor

    def create(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype, huge_pages: bool) -> PendingPanels | None:
        """A new file for `path`'s panels under a temporary name, mapped shared and writable; None (and one
        warning) where the disk has no room for it or the directory cannot be written."""
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}-{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            self._warn(f"cannot create {tmp} ({e})")
            return None
        try:
            os.posix_fallocate(fd, 0, nbytes)  # room on disk now, or an error now (never SIGBUS on a write)
            tensor = _map_tensor(fd, numel, dtype, mmap.ACCESS_WRITE, huge_pages).view(shape)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._warn(f"no room for {nbytes / 1e6:.0f} MB in {self.directory} ({e})")
            return None
        return PendingPanels(tensor, fd, tmp, path, huge_pages, self)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("packed weights cache: %s; packing in memory instead", message)

    def summary(self) -> str:
        return (f"{self.directory}: {self.num_mapped} layers mapped from it ({self.bytes_mapped / 1e9:.2f} GB), "
                f"{self.num_written} packed into it ({self.bytes_written / 1e9:.2f} GB)")


def _is_key(name: str) -> bool:
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def _is_stale(entry: Path) -> bool:
    """Whether the checkpoint `entry/meta.json` names is gone or has changed (its key is no longer the entry's
    name). An entry without a readable meta.json is not: another process may be making it now."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        model_dir = Path(meta["model"])
        dtype = getattr(torch, str(meta["dtype"]).removeprefix("torch."))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    try:
        return not model_dir.is_dir() or checkpoint_key(model_dir, dtype) != entry.name
    except (OSError, ValueError):  # its files are gone, or the loader would refuse them
        return True


def prune(root: Path, keep: str | None = None) -> list[Path]:
    """Delete the entries under `root` whose checkpoint is gone or has changed since (its key differs), and the
    temporary files of processes no longer alive. Only directories named as entries are (32 hex digits, with a
    `meta.json`): whatever else `root` holds is left alone. Returns what was deleted."""
    deleted = []
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        if not entry.is_dir():
            continue
        if not _is_key(entry.name):
            continue  # not an entry of ours: never touched
        if entry.name != keep and _is_stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
            deleted.append(entry)
            continue
        for tmp in entry.glob(f"*{_TMP}*"):
            pid = tmp.name.rsplit(_TMP, 1)[1].split("-")[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    deleted.append(tmp)
    return deleted
