"""Where fovea's engine start goes: `LLM(model)` once, in this process, timed by part (wall and CPU seconds).

    python benchmarks/load_profile.py MODEL_DIR [--threads 2] [--max-model-len 512] [--cprofile 25]

Parts: the C++ kernels' build check (`kernels.configure`), building the model (`build_model`), each checkpoint
tensor's way in by kind (a linear layer's repack in its hook, by method and by tower; q/k/v packed one by one
into their stacked layer's panels as they load; copies through a weight loader, e.g. bfloat16 -> float32 for the
Q-Former; copies out of the file of what a module keeps as it is), the memory profiling pass (one worst-case step
through `fovea.worker.profile_view`), the KV pool, and
whatever else `LLM(...)` does (tokenizer, processor, chat template: the remainder). The page cache is warmed
first (one read of the checkpoint), so the disk is not measured. After the load, 1 GiB of fresh memory is filled
on 2 MiB and on 4 KiB pages (`fresh_memory_floor`): what writing the checkpoint's bytes once costs at least. `--cprofile N` also prints the N functions
with the most cumulative time (cProfile slows Python-heavy parts a little; the part figures are taken without).

Real-size checkpoints take several GB: run them under the shared memory lock (`flock /work/bigmem.lock ...`).
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TIMES: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])  # part -> wall, cpu, calls


def timed(part_of, fn):
    """`fn` with its wall and CPU time added to TIMES[part_of(*args)] (nested parts are counted in both)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            entry = TIMES[part_of(*args, **kwargs) if callable(part_of) else part_of]
            entry[0] += time.perf_counter() - wall
            entry[1] += time.process_time() - cpu
            entry[2] += 1
    return wrapper


def tower(module_name: str) -> str:
    for prefix in ("vision_model", "visual", "qformer", "language_model", "lm_head", "model"):
        if module_name.startswith(prefix):
            return prefix
    return module_name.split(".")[0]


def instrument() -> None:
    from fovea import kernels
    from fovea.layers import linear, linear_methods
    from fovea.models import weights
    from fovea.worker import model_runner

    names: dict[int, str] = {}
    build = weights.build_model

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        names.update({id(m): n for n, m in model.named_modules()})
        return model

    weights.build_model = timed("build the model (no weights)", build_model)
    prepare = linear.prepare_loaded_layer

    def prepare_loaded_layer(module, owners):
        wall, cpu = time.perf_counter(), time.process_time()
        result = prepare(module, owners)
        if isinstance(module, linear.LinearBase):
            entry = TIMES[f"weights: repack, {tower(names.get(id(module), '?'))}, {module.method.name}"]
            entry[0] += time.perf_counter() - wall
            entry[1] += time.process_time() - cpu
            entry[2] += 1
        return result

    weights.prepare_loaded_layer = prepare_loaded_layer
    panel = linear_methods.PanelLinearMethod
    panel.pack_shard = timed(lambda self, layer, *rest: f"weights: repack, {tower(names.get(id(layer), '?'))}, "
                             f"{self.name}, q/k/v (gate/up) packed as they load", panel.pack_shard)
    default_loader = weights.default_weight_loader
    weights.default_weight_loader = timed(
        lambda param, loaded, shard: f"weights: copy {loaded.dtype}->{param.dtype} (default loader)", default_loader)
    weights.copy_checked = linear.copy_checked = timed(
        lambda dst, src: f"weights: copy {src.dtype}->{dst.dtype} (any loader)", linear.copy_checked)
    weights._give_back = timed("weights: copy kept tensors out of the file", weights._give_back)
    weights.load_weights = timed("weights: load_weights (all of the above)", weights.load_weights)
    model_runner.load_model = timed("weights: load_model (all)", model_runner.load_model)
    kernels.configure = timed("kernels.configure (build check)", kernels.configure)
    model_runner.kernels.configure = kernels.configure
    runner = model_runner.ModelRunner
    runner.profile_peak_bytes = timed("profiling pass (all)", runner.profile_peak_bytes)
    runner._profile_step = timed(
        lambda self, num_tokens, items: f"profiling pass: step of {len(items)} items, {num_tokens} tokens",
        runner._profile_step)
    runner.allocate_kv_cache = timed("KV pool allocation", runner.allocate_kv_cache)


def fresh_memory_floor(checkpoint_bytes: int, fill_bytes: int = 1 << 30) -> None:
    """After the load (and 5 s idle): the cost of writing memory the process never touched, on 2 MiB pages (where
    the language model's packed weights live) and on 4 KiB pages, 1 GiB each with `fill_` on all threads: what
    writing the checkpoint's bytes once costs at least here (on a VM whose host takes free memory back, the first
    write into it faults to the host; free page reporting hands blocks of 2 MiB and more back ~2 s after they are
    freed, so memory freed just before is cheap and is not what a load gets)."""
    import torch

    from fovea.kernels.ops import extension

    time.sleep(5)  # memory the load freed is reused at once, cheaply; after ~2 s idle the host has it back
    held = []
    for name, huge in (("2 MiB", True), ("4 KiB", False)):
        t = torch.empty(fill_bytes // 2, dtype=torch.bfloat16)
        if huge and extension() is not None:
            extension().advise_huge_pages(t)
        wall, cpu = time.perf_counter(), time.process_time()
        t.fill_(1)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        held.append(t)  # kept, as the loaded weights are: freed memory would be reused by the next fill
        print(f"fresh memory, {name} pages: {fill_bytes / 1e9 / wall:.2f} GB/s wall, {cpu / fill_bytes * 1e9:.2f} "
              f"CPU-s per GB: writing the checkpoint's {checkpoint_bytes / 1e9:.2f} GB once costs >= "
              f"{checkpoint_bytes / fill_bytes * wall:.1f} s wall at that rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--cprofile", type=int, default=0, help="print this many functions by cumulative time")
    args = parser.parse_args()
    for path in sorted(args.model_dir.glob("*.safetensors")):  # warm the page cache
        with open(path, "rb") as f:
            while f.read(1 << 26):
                pass
    import torch

    torch.set_num_threads(args.threads)
    from fovea import LLM

    instrument()
    profiler = cProfile.Profile() if args.cprofile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    LLM(str(args.model_dir), dtype="bfloat16", max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        num_threads=args.threads)
    if profiler:
        profiler.disable()
    total = (time.perf_counter() - wall, time.process_time() - cpu)
    print(f"LLM({args.model_dir.name}): {total[0]:.2f} s wall, {total[1]:.2f} CPU-s")
    print("| part | wall s | CPU s | calls |\n| --- | --- | --- | --- |")
    for part, (w, c, n) in sorted(TIMES.items()):
        print(f"| {part} | {w:.2f} | {c:.2f} | {n} |")
    fresh_memory_floor(sum(path.stat().st_size for path in args.model_dir.glob("*.safetensors")))
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.cprofile)
        print(out.getvalue())


if __name__ == "__main__":
    main()
