"""Build fovea's C++ kernels (`csrc/*.cpp`, `csrc/*.h`) as one torch extension, cached by what changes the binary.

The extension is built with torch.utils.cpp_extension.load from the real files, into
`<cache root>/fovea_kernels_<key>/`, where the key hashes everything the binary depends on:

- the bytes of every source and header,
- the compiler flags, and the compiler (its path and `--version`),
- what `-march=native` means on this CPU (the target flags the compiler expands it to: instruction sets, cache
  sizes) and the CPU's flags from /proc/cpuinfo: a binary built on a host with AMX or AVX-512 is never loaded on
  one without, even when both share a home directory (normal on clusters),
- torch's version and the Python ABI.

A finished build is imported straight from its directory (no compiler run); a missing one is built under a file
lock (one process builds, the others wait and then import it) in a scratch directory that is renamed into place
only when complete, so an interrupted build leaves nothing that looks finished. Any failure raises
`KernelBuildError` carrying the compiler's output.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"

CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off")
"""-fno-trapping-math: gcc vectorises no loop that calls `exp_approx` without it (its floor could raise an FP flag;
fovea never reads those flags, and the values are the same). -ffp-contract=off: the fused kernels reproduce
torch's roundings op by op, so no product may be fused into an add unasked (kernels that want FMAs ask for them:
`mul_add<true>` in common.h)."""
LDFLAGS = ("-fopenmp",)
LIBRARY_SUFFIX = ".pyd" if os.name == "nt" else ".so"  # what torch's build names the module


class KernelBuildError(RuntimeError):
    """fovea's C++ kernels could not be built or loaded here; the message carries the compiler's output."""


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """What to build and where: every `.cpp` of `source_dir` (headers beside them), cached under `cache_root`."""

    source_dir: Path = SOURCE_DIR
    cache_root: Path | None = None
    """None: $XDG_CACHE_HOME/fovea/kernels, else ~/.cache/fovea/kernels."""
    cflags: tuple[str, ...] = CFLAGS
    ldflags: tuple[str, ...] = LDFLAGS

    def resolved_cache_root(self) -> Path:
        if self.cache_root is not None:
            return Path(self.cache_root)
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "fovea" / "kernels"


def compiler() -> str:
    """The C++ compiler torch's build runs: $CXX, else `c++`."""
    return os.environ.get("CXX", "c++")


def compiler_identity(cxx: str) -> str:
    """The compiler's resolved path and first `--version` line; KernelBuildError when there is none."""
    path = shutil.which(cxx)
    if path is None:
        raise KernelBuildError(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX or install g++)")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelBuildError(f"the C++ compiler {path} does not run: {err}") from err
    return f"{os.path.realpath(path)} {out.strip().splitlines()[0] if out.strip() else ''}"


def native_target(cxx: str) -> str:
    """What `-march=native` expands to on this CPU: the target flags the compiler driver hands its backend
    (gcc: -march=znver3 -mavx512f ... --param l2-cache-size=1024 -mtune=znver3; clang: -target-cpu,
    -target-feature). Empty when the driver does not say (the CPU flags still key the cache)."""
    try:
        out = subprocess.run([cxx, "-###", "-march=native", "-x", "c++", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in out.stderr.splitlines():
        if "cc1" not in line:
            continue
        tokens = shlex.split(line)
        kept = []
        for i, token in enumerate(tokens):
            before = tokens[i - 1] if i else ""
            if (token.startswith("-m") or before in ("--param", "-target-cpu", "-target-feature", "-tune-cpu")
                    or token.startswith("--param=")):
                kept.append(token)
        return " ".join(kept)
    return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (x86 `flags`, Arm `Features`); empty elsewhere.

    Read once per process: every linear layer asks while a model loads (which kernel runs it), and parsing
    /proc/cpuinfo each time cost ~0.2 s of a real-size load (BLIP-2 OPT-2.7b: ~290 reads). A process does not
    move to another CPU model while it runs."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def read_sources(source_dir: Path) -> dict[str, bytes]:
    """name -> bytes of every .cpp / .h / .hpp file of `source_dir`."""
    files = sorted(p for p in Path(source_dir).iterdir() if p.suffix in (".cpp", ".h", ".hpp"))
    if not any(p.suffix == ".cpp" for p in files):
        raise KernelBuildError(f"no .cpp sources in {source_dir}")
    return {p.name: p.read_bytes() for p in files}


def cache_key(sources: dict[str, bytes], cflags: tuple[str, ...], ldflags: tuple[str, ...], compiler_id: str,
              native: str, cpu: frozenset[str], torch_version: str, python_abi: str) -> str:
    """A 16-hex-digit digest of everything the binary depends on (see the module docstring)."""
    record = {
        "sources": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(sources.items())},
        "cflags": list(cflags),
        "ldflags": list(ldflags),
        "compiler": compiler_id,
        "native": native,
        "cpu": sorted(cpu),
        "torch": torch_version,
        "python": python_abi,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def extension_name(spec: BuildSpec) -> str:
    """`fovea_kernels_<key>`: the module's name and its directory's under the cache root, on this host."""
    import torch

    cxx = compiler()
    key = cache_key(read_sources(spec.source_dir), spec.cflags, spec.ldflags, compiler_identity(cxx),
                    native_target(cxx), cpu_flags(), torch.__version__,
                    f"{sys.implementation.cache_tag} {platform.machine()}")
    return f"fovea_kernels_{key}"


def build(spec: BuildSpec = BuildSpec()):
    """The extension module built from `spec` (reused from the cache when there), or KernelBuildError."""
    name = extension_name(spec)
    root = spec.resolved_cache_root()
    final = root / name
    library = final / f"{name}{LIBRARY_SUFFIX}"
    if library.is_file():
        return _import(name, library)
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"{name}.lock"):
        if library.is_file():  # another process built it while this one waited
            return _import(name, library)
        scratch = root / f"{name}.partial"
        shutil.rmtree(scratch, ignore_errors=True)  # what an interrupted build left
        scratch.mkdir()
        try:
            module = _compile(name, spec, scratch)
            os.rename(scratch, final)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return module


def _compile(name: str, spec: BuildSpec, directory: Path):
    from torch.utils.cpp_extension import load

    cpp = sorted(str(p) for p in Path(spec.source_dir).iterdir() if p.suffix == ".cpp")
    try:
        return load(name=name, sources=cpp, extra_cflags=list(spec.cflags), extra_ldflags=list(spec.ldflags),
                    build_directory=str(directory), verbose=False)
    except Exception as err:  # torch's message holds ninja's output: the compiler's command and errors
        raise KernelBuildError(f"fovea's C++ kernels ({spec.source_dir}) did not build: {err}") from err


def _import(name: str, library: Path):
    try:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as err:
        raise KernelBuildError(f"fovea's C++ kernels at {library} did not load: {err}") from err
    return module


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock between processes, released by the OS if the holder dies (unlike a lock file)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builds are not serialised between processes
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
