"""Loading's repack into fresh memory on 2 MiB vs 4 KiB pages, and decode reading each: the trade the packed
weights' page size makes (`fovea.kernels.panels.pack_weight` advises 2 MiB pages).

Packs BLIP-2 OPT-2.7b's fc1/fc2 weights straight from the memory-mapped checkpoint (as loading does), a group of
14 (0.73 GB) per variant, alternating 2 MiB / 4 KiB, every packed weight kept until the end (as at load: no
memory reused), then runs the AVX-512 BF16 kernel on one row over each group alternately (decode GB/s, wall).

    FOVEA_BENCH_CACHE=/work/bench-cache python benchmarks/pack_pages.py [--threads 2]

Why it matters here: this machine is a VM whose balloon reports free blocks of 2 MiB and more to the host
(`/sys/module/page_reporting/parameters/page_reporting_order` = 9), which discards them; memory taken from such
a block costs host faults on its first write, and 2 MiB pages can only come from such blocks, while 4 KiB pages
also come from smaller free runs the host still backs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="pack rounds per variant (0.73 GB each)")
    args = parser.parse_args()
    import torch

    from benchmarks import real_size_checkpoints
    from fovea.kernels import bf16_linear, panels
    from fovea.kernels.ops import extension
    from fovea.models.safetensors_mmap import SafetensorsFile

    torch.set_num_threads(args.threads)
    ext = extension()
    if ext is None or not bf16_linear.available():
        sys.exit("needs fovea's C++ kernels with the AVX-512 BF16 linear kernel")
    path = real_size_checkpoints.blip2_opt_2_7b() / "model.safetensors"
    with open(path, "rb") as f:  # warm the page cache: the disk is not measured
        while f.read(1 << 26):
            pass
    f = SafetensorsFile(path)
    names = [n for n in f.keys() if n.startswith("language_model.model.decoder.layers.")
             and n.endswith((".fc1.weight", ".fc2.weight"))]
    groups = [names[i:i + 14] for i in range(0, len(names), 14)][:2 * args.rounds]
    packed: dict[str, list] = {"2 MiB": [], "4 KiB": []}
    print(f"{path.parent.name}: repack into fresh memory, every packed weight kept; {args.threads} threads")
    for i, group in enumerate(groups):
        variant = "2 MiB" if i % 2 == 0 else "4 KiB"
        wall, cpu, nbytes = time.perf_counter(), time.process_time(), 0
        for name in group:
            weight = f.get(name)
            n, k = weight.shape
            out = torch.empty(panels.padded(n) // 32, panels.padded(k) // 32, 2, 16, 16, 2, dtype=weight.dtype)
            if variant == "2 MiB":
                ext.advise_huge_pages(out)
            ext.pack_panels_(out, weight)
            packed[variant].append((out, n, k))
            nbytes += weight.nbytes
            del weight
            f.release(name)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"pack, {variant} pages: {nbytes / 1e9:.2f} GB in {wall:.2f} s ({cpu:.2f} CPU-s): "
              f"{nbytes / 1e9 / cpu:.2f} GB per CPU-s")
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for group in packed.values() for _, _, k in group}
    rates: dict[str, list[float]] = {"2 MiB": [], "4 KiB": []}
    for _ in range(6):
        for variant, group in packed.items():
            start, nbytes = time.perf_counter(), 0
            for out, n, k in group:
                bf16_linear.linear(xs[k], out, n, None)
                nbytes += out.nbytes
            rates[variant].append(nbytes / (time.perf_counter() - start) / 1e9)
    for variant, r in rates.items():
        print(f"decode (1 row), {variant} pages: best {max(r):.1f} GB/s, median {sorted(r)[len(r) // 2]:.1f}")


if __name__ == "__main__":
    main()
