"""How the kernels are built, cached and switched: the cache key, a broken source under "require" and "auto",
the "off" mode, the status line and its logging, and the one extension holding every kernel."""
from __future__ import annotations

import logging
import platform
import shutil
from pathlib import Path

import pytest
import torch

from fovea import kernels
from fovea.config import _CPU_KERNEL_MODES, EngineConfig
from fovea.kernels import build as kbuild
from fovea.kernels import runtime as kruntime
from fovea.kernels.build import BuildSpec, KernelBuildError, cache_key
from fovea.kernels.runtime import KernelRuntime
from tests.kernels import requires_compiler

BROKEN = "fovea_deliberately_undeclared"


# ---- the cache key -------------------------------------------------------------------------------------------

_BASE = dict(sources={"a.cpp": b"int a;", "common.h": b"#pragma once"}, cflags=("-O3", "-march=native"),
             ldflags=("-fopenmp",), compiler_id="/usr/bin/g++ g++ 12.2.0", native="-march=znver3 -mavx512f",
             cpu=frozenset({"avx512f", "avx512_bf16"}), torch_version="2.13.0", python_abi="cpython-311 x86_64")


@pytest.mark.parametrize("change", [
    {"sources": {"a.cpp": b"int b;", "common.h": b"#pragma once"}},  # a source's bytes
    {"sources": {"a.cpp": b"int a;", "common.h": b"#pragma once\n"}},  # a header's
    {"sources": {"a.cpp": b"int a;", "common.h": b"#pragma once", "b.cpp": b""}},  # one more file
    {"cflags": ("-O2", "-march=native")},
    {"ldflags": ()},
    {"compiler_id": "/usr/bin/g++ g++ 13.1.0"},
    {"native": "-march=sapphirerapids -mavx512f -mamx-tile -mamx-bf16"},  # -march=native on another CPU
    {"cpu": frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})},  # a host with AMX
    {"torch_version": "2.14.0"},
    {"python_abi": "cpython-312 x86_64"},
])
def test_cache_key_changes_with_everything_the_binary_depends_on(change):
    assert cache_key(**_BASE) == cache_key(**dict(_BASE))  # deterministic
    assert cache_key(**{**_BASE, **change}) != cache_key(**_BASE)


@requires_compiler
def test_native_target_is_stable_and_names_the_instruction_sets():
    cxx = kbuild.compiler()
    first, second = kbuild.native_target(cxx), kbuild.native_target(cxx)
    assert first == second  # no temporary file names: the key must not change from one process to the next
    if platform.machine() == "x86_64" and "g++" in kbuild.compiler_identity(cxx):
        assert "-march=" in first and "-mtune=" in first and "-mavx2" in first


def test_a_missing_compiler_is_a_build_error_naming_it(monkeypatch):
    monkeypatch.setenv("CXX", "fovea-no-such-compiler")
    with pytest.raises(KernelBuildError, match="no C.. compiler: 'fovea-no-such-compiler'"):
        kbuild.build(BuildSpec())


# ---- a broken source: "require" raises, "auto" falls back and says why ----------------------------------------


def _broken_spec(tmp_path: Path) -> BuildSpec:
    """A copy of the real fused kernels (with the headers) using one undeclared name, cached under tmp_path. The
    other .cpp files are left out only to keep the failing build short."""
    source = tmp_path / "csrc"
    shutil.copytree(kbuild.SOURCE_DIR, source)
    for path in source.glob("*.cpp"):
        if path.name != "fused.cpp":
            path.unlink()
    fused = source / "fused.cpp"
    fused.write_text(f"int broken = {BROKEN};\n" + fused.read_text())
    return BuildSpec(source_dir=source, cache_root=tmp_path / "cache")


@requires_compiler
def test_broken_source_under_require_raises_with_the_compilers_message(tmp_path, caplog):
    spec = _broken_spec(tmp_path)
    runtime = KernelRuntime(spec, mode="require")
    with pytest.raises(KernelBuildError) as err:
        runtime.get()
    message = str(err.value)
    assert BROKEN in message and "error" in message and "fused.cpp" in message  # gcc's own words
    with pytest.raises(KernelBuildError):  # every use, not only the first
        runtime.status()
    # nothing that looks finished is left in the cache, and the real cache was not touched
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []

    # "auto": the same failure, remembered (not rebuilt), logged once with the compiler's message
    runtime.set_mode("auto")
    with caplog.at_level(logging.INFO, logger="fovea.kernels"):
        assert runtime.get() is None and runtime.get() is None
        status = runtime.status()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and BROKEN in warnings[0] and "torch ops run instead" in warnings[0]
    assert not status.fused.is_active and not status.paged_attention.is_active and not status.amx_linear.is_active
    assert status.fused.reason.startswith("C++ build failed: ") and BROKEN in status.fused.reason
    assert "fused=off (C++ build failed: " in status.summary()


def test_auto_builds_once_per_process(tmp_path, monkeypatch):
    calls = []

    def failing_build(spec):
        calls.append(spec)
        raise KernelBuildError("c++: error: nothing to see")

    monkeypatch.setattr(kruntime, "build", failing_build)
    runtime = KernelRuntime(BuildSpec(source_dir=tmp_path), mode="auto")
    for _ in range(3):
        assert runtime.get() is None
    runtime.set_mode("off")
    runtime.set_mode("auto")
    assert runtime.get() is None and len(calls) == 1



def test_cpu_flags_are_read_once_however_many_layers_ask(monkeypatch):
    """Every linear layer asks which kernel runs it while a model loads; /proc/cpuinfo is parsed once."""
    from fovea.layers.linear import Linear, prepare_linear_layer

    opened = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    kbuild.cpu_flags.cache_clear()
    try:
        first = kbuild.cpu_flags()
        for _ in range(20):
            prepare_linear_layer(Linear(64, 64, dtype=torch.bfloat16))
            kruntime.cpu_has_amx(), kruntime.cpu_has_avx512_bf16(), kruntime.cpu_has_bf16_linear_isa()
    finally:
        monkeypatch.undo()
    assert kbuild.cpu_flags() == first
    assert len(opened) == (1 if Path("/proc/cpuinfo").exists() else 0)

# ---- modes and status --------------------------------------------------------------------------------------------


def test_off_builds_nothing_and_turns_every_path_off(tmp_path, caplog):
    runtime = KernelRuntime(BuildSpec(source_dir=tmp_path / "nowhere"), mode="off")
    with caplog.at_level(logging.INFO, logger="fovea.kernels"):
        assert runtime.get() is None
        status = runtime.status()
        runtime.status()
        runtime.set_mode("off")
        runtime.status()
    assert status.summary() == ("cpu kernels: fused=off (cpu_kernels=off) paged_attention=off (cpu_kernels=off) "
                                "amx_linear=off (cpu_kernels=off) onednn_linear=off (cpu_kernels=off) "
                                "int8_linear=off (cpu_kernels=off) bf16_linear=off (cpu_kernels=off) "
                                "rows_linear=off (cpu_kernels=off)")
    assert [r.getMessage() for r in caplog.records] == [status.summary() + " (cpu_kernels=off)"]  # logged once


def test_process_mode_off_sends_every_caller_to_torch():
    kernels.set_mode("off")
    x = torch.randn(3, 8)
    assert kernels.get_mode() == "off" and not kernels.is_available() and not kernels.can_fuse(x)
    with pytest.raises(RuntimeError, match=r"do not run here \(off \(cpu_kernels=off\)\)"):
        kernels.rms_norm(x, torch.ones(8), 1e-6)


def test_modes_are_checked_and_the_config_knows_the_same_ones(tmp_path):
    assert _CPU_KERNEL_MODES == kernels.MODES == ("auto", "off", "require")
    with pytest.raises(ValueError, match="cpu_kernels='on' is not a mode; choose one of auto, off, require"):
        kernels.set_mode("on")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="cpu_kernels='fast' is not supported; choose one of auto, off, require"):
        EngineConfig(model=str(tmp_path), cpu_kernels="fast")
    assert EngineConfig(model=str(tmp_path)).cpu_kernels == "auto"


@requires_compiler
def test_the_one_extension_holds_every_kernel_and_sits_under_its_key():
    kernels.set_mode("require")
    module = kernels.extension()
    for name in ("rms_norm", "rotary_", "silu_mul", "first_argmax", "paged_decode", "amx_linear", "enable_amx",
                 "amx_compiled", "int8_linear", "int8_linear_compiled"):
        assert callable(getattr(module, name)), name
    if platform.machine() == "x86_64":
        assert module.amx_compiled()  # compiled on every x86-64 host, AMX or not; run only where the CPU has it
        assert module.int8_linear_compiled()  # likewise, run only where the CPU has AVX-512 BF16
    name = kbuild.extension_name(kernels.RUNTIME.spec)
    assert Path(module.__file__).name == f"{name}.so"  # the key computed now is the one it was built under
    assert (kernels.RUNTIME.spec.resolved_cache_root() / name / f"{name}.so").is_file()
    status = kernels.status()
    assert status.fused.is_active and status.paged_attention.is_active
    assert status.amx_linear.is_active == (kruntime.cpu_has_amx() and status.amx_linear.reason != kruntime.AMX_DENIED)
    if not kruntime.cpu_has_amx():
        assert status.amx_linear.reason == "no AMX on this CPU"
    assert status.int8_linear.is_active == kruntime.cpu_has_avx512_bf16()
    if not kruntime.cpu_has_avx512_bf16():
        assert status.int8_linear.reason == "no AVX-512 BF16 on this CPU"


def test_an_installed_package_carries_every_kernel_source():
    import fnmatch
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["fovea.kernels"]
    for path in kbuild.SOURCE_DIR.iterdir():
        assert any(fnmatch.fnmatch(f"csrc/{path.name}", p) for p in patterns), path.name
