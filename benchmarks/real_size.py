"""Real-size models: BLIP-2 OPT-2.7b (3.87 B parameters, bfloat16) in fovea and transformers, one engine after
another, each in a fresh process (issue 16's table); `--model llama-7b` runs the Llama-2-7B-shaped language model
(6.74 B parameters, 13.5 GB) text-only instead.

Per engine: load (wall and CPU seconds, to a model ready for its first request: fovea's `LLM(...)` including its
memory profiling pass, transformers' `from_pretrained` of the model and processor), the peak resident memory the
load added (VmHWM reset just before) against the checkpoint's bytes, TTFT of one request, decode tokens/s of one
request and of 8 at once (tokens after the step where the last of them got its first token, over that time), and
the process's peak resident memory over the whole run. Every timed request has an image and a prompt that no
earlier request used (one warm-up request first, on its own image), so neither engine's caches help; EOS is
ignored; greedy.

The checkpoints are written once into FOVEA_BENCH_CACHE (`benchmarks/real_size_checkpoints.py`). Real-size runs
hold the machine's shared memory lock, and only one runs at a time:

    flock /work/bigmem.lock python benchmarks/real_size.py [--engines fovea transformers] [--model blip2-opt-2.7b]

`--peers vllm` adds vLLM's CPU build with `benchmarks/peers.py`'s conventions (the interpreter from `--peer-python`
or FOVEA_PEERS_PYTHON, default `.venv-peers/bin/python` from `make bench-peers`; vLLM told its thread binding and
KV space by `peers.vllm_environment`); where that environment does not exist the column says it was not run.
The vLLM child uses the same code as fovea's (`LLM(...)`, `llm_engine.add_request` / `step`: vLLM's API).

`--in-place none language_model all` runs fovea once per `EngineConfig.in_place_weights` value (which
layers run from the checkpoint's pages instead of packed panels), each a column `fovea[policy]`; `--huge-pages
language_model none` once per `EngineConfig.huge_pages` value (a column `fovea[pages=value]`; with --in-place,
once per pair); `--packed-cache cold warm` once per state of fovea's packed weights cache (`fovea.models.packed_cache`,
under FOVEA_CACHE_DIR): `cold` empties it first (the first start of a checkpoint), `warm` finds what the run
before packed (every later start), `off` packs in memory. Before any engine runs, the checkpoint's files are read
once into the page cache, and so are the files of fovea's packed weights cache entry for it where one exists: no
engine's load measures the disk.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = ROOT / "benchmarks" / "real_size_child.py"


def checkpoint(model: str) -> Path:
    from benchmarks import real_size_checkpoints

    return {"blip2-opt-2.7b": real_size_checkpoints.blip2_opt_2_7b,
            "llama-7b": real_size_checkpoints.llama_7b}[model]()


def run_engine(python: str, engine: str, model_dir: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    if engine == "vllm":
        from benchmarks.peers import vllm_environment

        env.update(vllm_environment(args.threads))
    engine, _, options = engine.partition("[")  # fovea[language_model pages=none]
    cmd = [python, str(CHILD), engine, str(model_dir), "--threads", str(args.threads),
           "--decode-tokens", str(args.decode_tokens), "--batch-decode-tokens", str(args.batch_decode_tokens)]
    for option in options.rstrip("]").split():
        if option.startswith("pages="):
            cmd += ["--huge-pages", option.removeprefix("pages=")]
        elif option.startswith("cache="):
            cmd += ["--packed-cache", option.removeprefix("cache=")]
        else:
            cmd += ["--in-place", option]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    for line in reversed(result.stdout.strip().splitlines()):  # the child's JSON; an engine may print after it
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"no result line in the child's output: {result.stdout.strip()[-300:]!r}"}


def warm_packed_cache(model_dir: Path) -> None:
    """fovea's packed weights cache entry of this checkpoint (what a later start maps instead of packing), where an
    earlier run left one, brought into the page cache as an engine that wrote it leaves it: each file's pages
    dropped first (posix_fadvise DONTNEED: a plain read() brings a file back in small folios, which the kernel then
    maps 4 KiB at a time, and which stay so until evicted), then mapped with MADV_HUGEPAGE and populated, so the
    read-ahead takes 2 MiB folios, as `fovea.models.packed_cache` maps the language model's files."""
    import mmap

    import torch

    from fovea.models.packed_cache import checkpoint_key, default_root
    from fovea.worker.memory import make_resident

    entry = default_root() / checkpoint_key(model_dir, torch.bfloat16)
    for path in sorted(entry.glob("*.panels")):
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            mapping.madvise(mmap.MADV_HUGEPAGE)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                make_resident([torch.frombuffer(mapping, dtype=torch.uint8)])


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def row(label: str, results: dict[str, dict], fmt) -> str:
    cells = []
    for r in results.values():
        try:
            cells.append(fmt(r) if "error" not in r else "-")
        except KeyError:
            cells.append("-")
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["blip2-opt-2.7b", "llama-7b"], default="blip2-opt-2.7b")
    parser.add_argument("--engines", nargs="+", choices=["fovea", "transformers"], default=["transformers", "fovea"])
    parser.add_argument("--peers", nargs="*", choices=["transformers", "vllm"], default=[],
                        help="peer engines besides --engines (benchmarks' common flag)")
    parser.add_argument("--peer-python", default=os.environ.get("FOVEA_PEERS_PYTHON",
                                                                str(ROOT / ".venv-peers" / "bin" / "python")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=48, help="max_tokens of the one-request decode")
    parser.add_argument("--batch-decode-tokens", type=int, default=32, help="max_tokens of each of the 8")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--in-place", nargs="+", choices=["language_model", "encoders", "all", "none"],
                        help="run fovea once per EngineConfig.in_place_weights value")
    parser.add_argument("--huge-pages", nargs="+", choices=["auto", "language_model", "none"],
                        help="run fovea once per EngineConfig.huge_pages value")
    parser.add_argument("--packed-cache", nargs="+", choices=["cold", "warm", "off"],
                        help="run fovea once per packed weights cache state, in this order: cold (the cache "
                             "directory emptied first), warm (as the run before left it), off")
    args = parser.parse_args()

    model_dir = checkpoint(args.model)
    file_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    # warm the page cache: no engine measures the disk
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(1 << 26):
                pass
    warm_packed_cache(model_dir)
    engines = list(dict.fromkeys(args.engines + args.peers))
    if (args.in_place or args.huge_pages or args.packed_cache) and "fovea" in engines:
        at = engines.index("fovea")
        engines[at:at + 1] = [
            f"fovea[{' '.join(filter(None, (policy, pages and f'pages={pages}', cache and f'cache={cache}')))}]"
            for policy in args.in_place or [None] for pages in args.huge_pages or [None]
            for cache in args.packed_cache or [None]]
    results: dict[str, dict] = {}
    for engine in engines:
        if engine == "vllm":
            if not Path(args.peer_python).exists():
                results[engine] = {"error": f"no peer environment at {args.peer_python} (make bench-peers)"}
                continue
            results[engine] = run_engine(args.peer_python, engine, model_dir, args)
        else:
            results[engine] = run_engine(sys.executable, engine, model_dir, args)
        print(f"{engine}: {json.dumps(results[engine])}", file=sys.stderr, flush=True)

    gb = 1e9
    print(f"{args.model}, bfloat16, {file_bytes / gb:.2f} GB checkpoint; {cpu_name()}, {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| | " + " | ".join(engines) + " |")
    print("| --- |" + " --- |" * len(engines))
    print(row("load, wall (CPU) s", results, lambda r: f"{r['load_s']:.1f} ({r['load_cpu_s']:.1f})"))
    print(row("of which the weights (fovea's load_model)", results,
              lambda r: f"{r['weights_s']:.1f} ({r['weights_cpu_s']:.1f})"))
    print(row("peak memory added while loading", results,
              lambda r: f"{r['load_peak_bytes'] / gb:.2f} GB ({r['load_peak_bytes'] / file_bytes:.2f}x the file)"))
    if any("packed_cache" in r for r in results.values()):
        print(row("packed weights cache: layers mapped / packed into it", results,
                  lambda r: "{mapped} ({mapped_gb:.1f} GB) / {written} ({written_gb:.1f} GB)".format(
                      **r["packed_cache"]) if "packed_cache" in r else "off"))
    print(row("mapped 2 MiB at a time at the end: anonymous / file pages", results,
              lambda r: "{anon:.2f} / {file:.2f} GB".format(**r["huge_mapped_gb"])))
    print(row("TTFT, one request", results, lambda r: f"{r['ttft_s']:.2f} s"))
    print(row("decode, 1 request", results, lambda r: f"{r['decode_1_tok_s']:.2f} tok/s"))
    print(row("decode, 8 requests", results, lambda r: f"{r['decode_8_tok_s']:.1f} tok/s"))
    print(row("peak memory of the process", results, lambda r: f"{r['process_peak_bytes'] / gb:.2f} GB"))
    for engine, r in results.items():
        if "error" in r:
            print(f"{engine}: not run ({r['error']})")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "file_bytes": file_bytes, "cpu": cpu_name(),
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
