"""The process-wide kernel mode, the lazily built extension, and which CPU paths are active and why.

Modes (`EngineConfig.cpu_kernels`, applied when an engine starts; `set_mode` for tests and scripts):

- "auto": use fovea's C++ kernels when they build; when they do not, log the compiler's message once and run
  torch's ops, which compute the same thing.
- "off": torch's own ops only: no C++ kernels, and linear layers stay dense (no oneDNN or AMX packing).
- "require": as "auto", but a build failure is an error (`KernelBuildError`) showing the compiler's message.

The extension is built on first use (once per process, under a lock), never at import. Afterwards the hot path
(`KernelRuntime.extension`) is one attribute read: no lock per call.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from fovea.kernels.build import BuildSpec, KernelBuildError, build, cpu_flags

logger = logging.getLogger("fovea.kernels")

MODES = ("auto", "off", "require")

UNRESOLVED = object()
"""`KernelRuntime.extension` before the current mode has been resolved (next use builds or decides)."""

AMX_CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")
NO_AMX = "no AMX on this CPU"
AMX_DENIED = "Linux did not grant the AMX tile state (arch_prctl)"
INT8_CPU_FLAGS = ("avx512_bf16", "avx512bw", "avx512vbmi", "avx512_vnni")
NO_AVX512_BF16 = "no AVX-512 BF16, VBMI and VNNI on this CPU"


BF16_LINEAR_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
NO_BF16_LINEAR = "no AVX-512 BF16 on this CPU"


def cpu_has_bf16_linear_isa() -> bool:
    """This CPU reports AVX-512 with BF16 dot products, what fovea's bfloat16 linear kernel runs on (AMD Zen 4,
    Intel Cooper Lake / Sapphire Rapids on)."""
    return all(flag in cpu_flags() for flag in BF16_LINEAR_CPU_FLAGS)


def cpu_has_avx512_bf16() -> bool:
    """This CPU reports AVX-512 BF16, BW, VBMI and VNNI (what fovea's int8 linear kernels run on)."""
    return all(flag in cpu_flags() for flag in INT8_CPU_FLAGS)


def cpu_has_amx() -> bool:
    """This CPU reports AMX-BF16 (with AVX-512 BF16 for the output rounding), whatever the build."""
    return all(flag in cpu_flags() for flag in AMX_CPU_FLAGS)


@dataclass(frozen=True, slots=True)
class PathStatus:
    """One CPU path: whether it runs, and why not when it does not."""

    is_active: bool
    reason: str = ""

    def describe(self) -> str:
        return "on" if self.is_active else f"off ({self.reason})" if self.reason else "off"


@dataclass(frozen=True, slots=True)
class KernelStatus:
    """Which of fovea's CPU paths run in this process, under `mode`.

    fused:          RMSNorm, rotary, SiLU-and-multiply and the sampler's argmax in C++ (`fovea.kernels.ops`).
    paged_attention: decode attention read straight from the paged KV cache, in C++.
    amx_linear:     bfloat16 linear layers (K, N multiples of 32) on fovea's AMX kernel; needs AMX-BF16.
    onednn_linear:  the other float32 / bfloat16 linear layers on oneDNN-packed weights; needs torch with oneDNN.
    int8_linear:    int8 layers on fovea's kernels (W8A16 with bfloat16 activations, W8A8); needs AVX-512 BF16
                    and VNNI.
    bf16_linear:    bfloat16 linear layers on fovea's AVX-512 BF16 kernel (every row count where there is no AMX);
                    needs AVX-512 BF16.
    rows_linear:    bfloat16 linear layers read straight from the checkpoint's row-major weights (views of the
                    mapped file) on fovea's AVX-512 BF16 kernel; needs AVX-512 BF16.
    """

    mode: str
    fused: PathStatus
    paged_attention: PathStatus
    amx_linear: PathStatus
    onednn_linear: PathStatus
    int8_linear: PathStatus
    bf16_linear: PathStatus
    rows_linear: PathStatus

    def summary(self) -> str:
        """One line: `cpu kernels: fused=on paged_attention=on amx_linear=off (no AMX on this CPU) ...`."""
        paths = ("fused", "paged_attention", "amx_linear", "onednn_linear", "int8_linear", "bf16_linear",
                 "rows_linear")
        return "cpu kernels: " + " ".join(f"{name}={getattr(self, name).describe()}" for name in paths)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"cpu_kernels={mode!r} is not a mode; choose one of {', '.join(MODES)}")
    return mode


class KernelRuntime:
    """The extension built from one `BuildSpec`, under a mode. fovea uses one (`fovea.kernels.RUNTIME`); tests
    make their own to build other sources elsewhere."""

    def __init__(self, spec: BuildSpec = BuildSpec(), mode: str = "auto"):
        self.spec = spec
        self.mode = check_mode(mode)
        self.extension = UNRESOLVED
        """The module, None (torch ops), or UNRESOLVED; read by every kernel call, so written only under _lock."""
        self._lock = threading.RLock()
        self._built = None  # the module, once built
        self._error: KernelBuildError | None = None  # the build's failure, once failed
        self._amx: PathStatus | None = None  # the AMX check, once made (it asks Linux for the tile state)
        self._status: KernelStatus | None = None
        self._logged: set[str] = set()

    def set_mode(self, mode: str) -> None:
        check_mode(mode)
        with self._lock:
            if mode != self.mode:
                self.mode = mode
                self.extension = UNRESOLVED
                self._status = None

    def resolve(self):
        """The extension under the current mode (building it on first use), or None; in "require" mode a
        failed build raises KernelBuildError, every time."""
        with self._lock:
            if self.extension is not UNRESOLVED:
                return self.extension
            if self.mode == "off":
                self.extension = None
                return None
            if self._built is None and self._error is None:
                try:
                    self._built = build(self.spec)
                except KernelBuildError as err:
                    self._error = err
            if self._error is not None:
                if self.mode == "require":
                    raise self._error
                self._log_once(logging.WARNING, f"fovea's C++ kernels are off, torch ops run instead: {self._error}")
            self.extension = self._built
            return self.extension

    def get(self):
        """The extension or None: the hot path (no lock once resolved)."""
        extension = self.extension
        return extension if extension is not UNRESOLVED else self.resolve()

    def status(self) -> KernelStatus:
        """Which paths are active and why (building the extension if that has not happened yet); logged once
        per process per distinct answer."""
        status = self._status
        if status is not None:
            return status
        with self._lock:
            extension = self.resolve()
            if self.mode == "off":
                off = PathStatus(False, "cpu_kernels=off")
                status = KernelStatus(self.mode, off, off, off, off, off, off, off)
            else:
                built = PathStatus(True) if extension is not None else PathStatus(False, self._failure())
                amx = self._amx_status(extension) if extension is not None else built
                int8 = _int8_status(extension) if extension is not None else built
                bf16 = _bf16_status(extension.bf16_linear_compiled()) if extension is not None else built
                rows = _bf16_status(extension.rows_linear_compiled()) if extension is not None else built
                status = KernelStatus(self.mode, built, built, amx, _onednn_status(), int8, bf16, rows)
            self._status = status
            self._log_once(logging.INFO, f"{status.summary()} (cpu_kernels={self.mode})")
            return status

    def _failure(self) -> str:
        lines = [line.strip() for line in str(self._error).splitlines() if line.strip()]
        first_error = next((line for line in lines if "error:" in line), lines[0] if lines else "")
        return f"C++ build failed: {first_error[:200]}"

    def _amx_status(self, extension) -> PathStatus:
        if self._amx is None:
            if not cpu_has_amx():
                self._amx = PathStatus(False, NO_AMX)
            elif not extension.amx_compiled():
                self._amx = PathStatus(False, "not compiled: needs x86-64 and gcc >= 11 or clang >= 12")
            elif not extension.enable_amx():
                self._amx = PathStatus(False, AMX_DENIED)
            else:
                self._amx = PathStatus(True)
        return self._amx

    def _log_once(self, level: int, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logger.log(level, "%s", message)


def _bf16_status(compiled: bool) -> PathStatus:
    """An AVX-512 BF16 kernel's path (`bf16_linear`, `rows_linear`): the CPU's ISA, then whether it was compiled."""
    if not cpu_has_bf16_linear_isa():
        return PathStatus(False, NO_BF16_LINEAR)
    if not compiled:
        return PathStatus(False, "not compiled: needs x86-64 and gcc >= 10 or clang >= 9")
    return PathStatus(True)


def _int8_status(extension) -> PathStatus:
    if not cpu_has_avx512_bf16():
        return PathStatus(False, NO_AVX512_BF16)
    if not extension.int8_linear_compiled():
        return PathStatus(False, "not compiled: needs x86-64 and gcc >= 11 or clang >= 12")
    return PathStatus(True)


def _onednn_status() -> PathStatus:
    import torch

    if torch.backends.mkldnn.is_available():
        return PathStatus(True)
    return PathStatus(False, "torch built without oneDNN")


RUNTIME = KernelRuntime()
"""fovea's own: the sources of fovea/kernels/csrc, cached under ~/.cache/fovea/kernels (or $XDG_CACHE_HOME)."""
