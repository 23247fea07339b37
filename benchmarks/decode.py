"""Single-stream decode of the Qwen benchmark model (`throughput_qwen.py`'s checkpoint: Qwen2-0.5B's language
model, bfloat16) with fovea's AVX-512 BF16 linear kernel vs oneDNN's packed linear, against the memory-read bound,
same run.

Each linear path runs in its own process, one after the other (`--methods`): "fovea" is what the engine picks on
this host; "onednn" turns fovea's own bfloat16 kernels off for linear layers only (as before they existed).
Decode tok/s = (max_tokens - 1) / (time of a `max_tokens` request minus time of a 1-token request, same prompt,
prefix cache reset), best of `--repeats` (`int8.py`'s measure). The bound is the bytes a decode step must read
(every LM linear weight and the `lm_head`, bfloat16) over the memory-read bandwidth measured the way the decode
reads (`benchmarks/bandwidth.py`: a buffer of the weights' size on 2 MiB pages, each thread streaming its own
contiguous run, with and without the kernels' prefetch; `torch.sum` beside them), `--read-repeats` times per
reader before the decode runs and again after them, so drift shows: THE bound is the fastest read of any reader
(bandwidth.py says why), the medians printed beside it.

`--profile` adds where a step's time goes, same run: (1) each decode linear shape of the model (qkv, o, gate/up,
down, lm_head) on fovea's bfloat16 and int8 kernels at 1 row, GB/s of weights read and its fraction of the
fastest read of bandwidth.py's readers at the same thread count, interleaved with them, on 1 and 2 threads
(enough copies of each weight that every call reads from memory); (2) one single-stream decode of
`--decode-tokens` in a child with `benchmarks/roofline_phases.py`'s recorder attached: the share of the decode
steps' time in the linears, attention, the rest of the forward (norms, rotary, embeddings, residual adds),
`lm_head`, sampler and scheduling / Python.

`--gaps` adds, same run, where the time between the linear layers goes: one single-stream decode in a child with
only fovea's bfloat16 linear kernel wrapped (two clock reads per call, nothing else), printing the median time
from the end of one linear call to the start of the next by position in a layer (qkv -> o: rotary, KV write,
attention; o -> gate_up: residual add + norm; gate_up -> down: SiLU-and-mul; down -> next qkv: add + norm;
down -> lm_head: the final norm; lm_head -> qkv: the rest of the step, sampler, scheduling, input building)
and their sum per decode step against the step's time. (The recorder of `--profile` hooks every linear and
attention module, so its decode runs the modules, not the decode plan of fovea/models/llama_decode.py, and its
hooks' own cost lands in "decode other"; `--gaps` wraps the extension's `bf16_linear`, which both paths call.)

    flock /work/bigmem.lock python benchmarks/decode.py [--decode-tokens 64] [--repeats 3] [--methods fovea onednn]
    python benchmarks/decode.py --profile --gaps --methods fovea   # every process under 3 GB
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bandwidth  # noqa: E402
from benchmarks.common import CACHE, prompts  # noqa: E402
from benchmarks.gemv import cpu_name  # noqa: E402
from benchmarks.throughput_qwen import MAX_PIXELS, build_checkpoint  # noqa: E402


def decode_bytes(path: Path) -> int:
    """Bytes of bfloat16 weights one decode step reads: the LM's linear layers and its lm_head."""
    text = json.loads((path / "config.json").read_text())["text_config"]
    h, i, layers, vocab = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], text["vocab_size"]
    head_dim = h // text["num_attention_heads"]
    qkv = (text["num_attention_heads"] + 2 * text["num_key_value_heads"]) * head_dim * h
    per_layer = qkv + h * h + 2 * i * h + i * h
    return 2 * (layers * per_layer + vocab * h)


def model_shapes(path: Path) -> dict[str, tuple[int, int]]:
    """(N, K) of each decode linear of the Qwen benchmark LM and of its lm_head."""
    text = json.loads((path / "config.json").read_text())["text_config"]
    h, i, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    head_dim = h // text["num_attention_heads"]
    qkv = (text["num_attention_heads"] + 2 * text["num_key_value_heads"]) * head_dim
    return {"qkv": (qkv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (vocab, h)}


def profile_linears(shapes: dict[str, tuple[int, int]], repeats: int, min_bytes: int = 64 << 20) -> None:
    """Per shape and kernel at 1 row: GB/s of weights read against `torch.sum` on the same thread count."""
    from fovea import kernels
    from fovea.kernels import bf16_linear, int8_linear

    kernels.set_mode("require")
    g = torch.Generator().manual_seed(0)
    runs = {}  # name -> (callable over every copy, bytes read)
    for name, (n, k) in shapes.items():
        x = torch.randn(1, k, generator=g).bfloat16()
        if bf16_linear.available():
            packed = [bf16_linear.pack_weight(torch.randn(n, k, generator=g).bfloat16())
                      for _ in range(max(1, min_bytes // (2 * n * k)))]
            runs[f"bf16 {name}"] = (lambda x=x, p=packed, n=n: [bf16_linear.linear(x, w, n, None) for w in p],
                                    2 * n * k * len(packed))
        if int8_linear.available():
            scale = torch.full((n,), 0.01, dtype=torch.bfloat16)
            packed = [int8_linear.pack_weight(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8))
                      for _ in range(max(1, min_bytes // (n * k)))]
            runs[f"int8 {name}"] = (
                lambda x=x, p=packed, n=n, s=scale: [int8_linear.linear(x, w, n, s, None) for w in p],
                n * k * len(packed))
    buffer = bandwidth.huge_page_buffer(512 << 20)  # on 2 MiB pages, as the packed weights are
    for threads in (1, 2):
        torch.set_num_threads(threads)
        readers = bandwidth.READERS
        best = dict.fromkeys(list(runs) + list(readers), float("inf"))
        for _ in range(repeats):  # interleaved: a busy neighbour slows every entry alike
            for name in best:
                if name in readers:
                    seconds = bandwidth.time_reader(name, buffer)
                else:
                    start = time.perf_counter()
                    runs[name][0]()
                    seconds = time.perf_counter() - start
                best[name] = min(best[name], seconds)
        bound = buffer.nbytes / min(best[r] for r in readers) / 1e9
        print(f"  decode linears at 1 row, {threads} thread(s): the bound {bound:.1f} GB/s (the fastest read: "
              + ", ".join(f"{r} {buffer.nbytes / best[r] / 1e9:.1f}" for r in readers) + ")")
        for name, (_, num_bytes) in runs.items():
            rate = num_bytes / best[name] / 1e9
            print(f"    {name:14s} {rate:6.1f} GB/s = {rate / bound:5.1%} of the bound", flush=True)


def profile_step(path: Path, decode_tokens: int, bandwidth: float, threads: int) -> None:
    """In a child process: one recorded single-stream decode; each phase's share of the decode-only steps."""
    from benchmarks.roofline_phases import PhaseRecorder
    from fovea import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=4, kv_cache_memory_bytes=1 << 28)
    prompt = prompts(1, 10, 100000, seed=7)[0]
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    recorder = PhaseRecorder(llm)
    try:
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        wall = time.perf_counter() - start
    finally:
        recorder.remove()
    totals = recorder.totals
    totals.finish(wall)
    phases = totals.phases
    # the prompt's step (LM prefill) is left out: what remains is decode steps and their share of Python
    names = ["decode linears", "lm_head", "decode attention", "decode other", "sampler", "scheduling / Python"]
    decode_s = sum(phases[n].seconds for n in names)
    print(f"  one decode of {decode_tokens} tokens, {threads} thread(s): {totals.num_decode_steps} decode steps, "
          f"{decode_s / max(totals.num_decode_steps, 1) * 1e3:.2f} ms each (prompt step left out)")
    for name in names:
        p = phases[name]
        rate = f"{p.bytes / max(p.seconds, 1e-9) / 1e9:6.1f} GB/s = {p.bytes / max(p.seconds, 1e-9) / bandwidth:5.1%}" \
            f" of the bound" if p.bytes else ""
        print(f"    {name:20s} {p.seconds / decode_s:6.1%}  {rate}", flush=True)


def profile_gaps(path: Path, decode_tokens: int, threads: int) -> None:
    """In a child process: the time between consecutive linear kernel calls of a single-stream decode, by the
    pair of layers around the gap (named by their output width), median over the decode steps."""
    import statistics

    from fovea import LLM, SamplingParams
    from fovea.kernels.ops import extension

    torch.set_num_threads(threads)
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=4, kv_cache_memory_bytes=1 << 28)
    text = llm.llm_engine.runner.model.get_text_config()
    h, i, head_dim = text.hidden_size, text.intermediate_size, text.hidden_size // text.num_attention_heads
    qkv = (text.num_attention_heads + 2 * text.num_key_value_heads) * head_dim
    names = {qkv: "qkv", h: "o/down", 2 * i: "gate_up", text.vocab_size: "lm_head"}
    prompt = prompts(1, 10, 100000, seed=7)[0]
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    events: list[tuple[float, float, int, int]] = []  # (start, end, out_features, rows) of every call
    # the extension's own function: the modules' path (bf16_linear.linear) and the decode plan's
    # (fovea.models.llama_decode) both call it
    ext = extension()
    linear = ext.bf16_linear

    def timed(x, packed, out_features, bias):
        start = time.perf_counter()
        y = linear(x, packed, out_features, bias)
        events.append((start, time.perf_counter(), out_features, x.shape[0]))
        return y

    ext.bf16_linear = timed
    try:
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        wall = time.perf_counter() - start
    finally:
        ext.bf16_linear = linear
    gaps: dict[tuple[str, str], list[float]] = {}
    kernel_s = 0.0
    for (_, prev_end, prev_out, prev_rows), (begin, end, out, rows) in zip(events, events[1:]):
        if rows == 1:
            kernel_s += end - begin
        if rows == 1 and prev_rows == 1:  # decode steps only (the prompt's step has more rows)
            gaps.setdefault((names.get(prev_out, str(prev_out)), names.get(out, str(out))), []).append(begin - prev_end)
    steps = max(1, len(gaps.get(("lm_head", "qkv"), [])))
    gap_s = sum(sum(v) for v in gaps.values())
    print(f"  gaps between linear layers, {threads} thread(s), {steps} decode steps; per step: "
          f"{(gap_s + kernel_s) / steps * 1e3:.2f} ms from the first linear to the last, of which the linear "
          f"kernels {kernel_s / steps * 1e3:.2f} ms and the gaps {gap_s / steps * 1e3:.2f} ms "
          f"({gap_s / max(gap_s + kernel_s, 1e-9):.1%}); whole generate {wall / decode_tokens * 1e3:.2f} ms per token")
    for (before, after), values in sorted(gaps.items(), key=lambda kv: -sum(kv[1])):
        print(f"    {before:>8s} -> {after:8s} {len(values) / steps:5.1f} per step, median "
              f"{statistics.median(values) * 1e6:7.1f} us, {sum(values) / steps * 1e3:6.2f} ms per step", flush=True)


def run_one(method: str, path: Path, decode_tokens: int, repeats: int, threads: int) -> None:
    """In a child process: load, warm up, print one JSON line."""
    from benchmarks.int8 import single_stream_decode
    from fovea import LLM
    from fovea.layers import linear_methods

    torch.set_num_threads(threads)
    if method == "onednn":
        linear_methods.bf16_linear_supports = lambda weight: False
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=4, kv_cache_memory_bytes=1 << 28)
    prompt = prompts(1, 10, 100000, seed=7)[0]
    llm.generate([prompt], use_tqdm=False)  # warm-up
    tok_s = single_stream_decode(llm, prompt, decode_tokens, repeats)
    print(json.dumps({"method": method, "tok_s": tok_s}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--read-repeats", type=int, default=7, help="reads per reader before and after the runs")
    parser.add_argument("--methods", nargs="+", default=["fovea", "onednn"], choices=["fovea", "onednn"])
    parser.add_argument("--profile", action="store_true", help="per-shape kernel GB/s and a step's phases")
    parser.add_argument("--gaps", action="store_true", help="the time between linear layers, by position")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{MAX_PIXELS}", MAX_PIXELS)
    if args.child == "profile":
        profile_step(path, args.decode_tokens, args.bandwidth, args.threads)
        return
    if args.child == "gaps":
        profile_gaps(path, args.decode_tokens, args.threads)
        return
    if args.child:
        run_one(args.child, path, args.decode_tokens, args.repeats, args.threads)
        return
    from fovea import kernels

    kernels.set_mode("require")
    torch.set_num_threads(args.threads)
    num_bytes = decode_bytes(path)
    buffer = bandwidth.huge_page_buffer(num_bytes)
    bound = bandwidth.ReadBound(bandwidth.measure(buffer, "before", args.read_repeats))
    print(f"{cpu_name()}, {args.threads} threads; Qwen benchmark LM: {num_bytes / 1e9:.3f} GB read per decode step; "
          f"read bound on a buffer as large, {bandwidth.huge_page_bytes(buffer) / buffer.nbytes:.0%} of it on "
          f"2 MiB pages, {args.read_repeats} reads per reader before and after the decode runs")
    results = {}
    for method in args.methods:
        out = subprocess.run([sys.executable, __file__, "--child", method, "--decode-tokens", str(args.decode_tokens),
                              "--repeats", str(args.repeats), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])["tok_s"]
        print(f"  {method:7s} single-stream decode {results[method]:6.1f} tok/s "
              f"({num_bytes * results[method] / 1e9:.1f} GB/s of weights)", flush=True)
    bound.samples += bandwidth.measure(buffer, "after", args.read_repeats)
    del buffer
    print("  memory read, GB/s:")
    print("\n".join(bound.describe(num_bytes)))
    bandwidth_bytes = bound.bound_gbs * 1e9
    bound_tok_s = bandwidth_bytes / num_bytes
    median = bound.median(bound.bound_reader) * 1e9 / num_bytes
    print(f"  bound: {bound.bound_gbs:.1f} GB/s / {num_bytes / 1e9:.3f} GB = {bound_tok_s:.1f} tok/s "
          f"({bound.bound_reader} max; its median {median:.1f} tok/s)")
    for method, tok_s in results.items():
        print(f"  {method:7s} {tok_s:6.1f} tok/s = {tok_s / bound_tok_s:5.1%} of the bound "
              f"({tok_s / median:5.1%} of the median read)", flush=True)
    if {"fovea", "onednn"} <= results.keys():
        print(f"  fovea / onednn: {results['fovea'] / results['onednn']:.2f}x")
    if args.profile:
        out = subprocess.run([sys.executable, __file__, "--child", "profile", "--decode-tokens",
                              str(args.decode_tokens), "--threads", str(args.threads),
                              "--bandwidth", str(bandwidth_bytes)],
                             capture_output=True, text=True, check=True)
        print(out.stdout, end="", flush=True)
        profile_linears(model_shapes(path), max(args.repeats, 5))
    if args.gaps:
        out = subprocess.run([sys.executable, __file__, "--child", "gaps", "--decode-tokens", str(args.decode_tokens),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        print(out.stdout, end="", flush=True)


if __name__ == "__main__":
    main()
