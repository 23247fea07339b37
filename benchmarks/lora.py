"""LoRA overhead: offline throughput of the Qwen benchmark model with 4 adapters mixed in every batch vs no adapter.

The model is `throughput_qwen.py`'s Qwen2.5-VL (a language model with Qwen2-0.5B's dimensions, random weights) and
its requests (one chat turn with its own image each, 16-128 output tokens, EOS ignored). Four random rank-`--rank`
adapters on all seven projections of every decoder layer (q, k, v, o, gate, up, down), written in PEFT's format;
requests take adapters 1, 2, 3, 4 in turn. Three runs on the same requests, each in a freshly loaded engine:

    base       enable_lora off, no adapter (the reference)
    lora-idle  enable_lora on, no request names an adapter (what the LoRA layers cost when unused)
    lora-mixed enable_lora on, max_loras 4, the four adapters mixed in every batch

Prints useful output tokens/s and each run's ratio to `base`. With `--repeats N` each run is timed N times and its
fastest counts.

    python benchmarks/lora.py [--num-requests 16] [--dtype bfloat16] [--rank 16] [--repeats 1]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CACHE, time_offline  # noqa: E402
from benchmarks.throughput_qwen import MAX_PIXELS, build_checkpoint, chats, requests  # noqa: E402

PROJECTIONS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


def write_adapter(path: Path, model_dir: Path, rank: int, seed: int) -> Path:
    """A random adapter in PEFT's format (adapter_config.json, adapter_model.safetensors) for every projection."""
    if (path / "adapter_model.safetensors").exists():
        return path
    text = json.loads((model_dir / "config.json").read_text())["text_config"]
    hidden, inter, heads, kv_heads = (text["hidden_size"], text["intermediate_size"], text["num_attention_heads"],
                                      text["num_key_value_heads"])
    head_dim = hidden // heads
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(text["num_hidden_layers"]):
        for block, names in PROJECTIONS.items():
            for name in names:
                fan_in, fan_out = shapes[name]
                prefix = f"base_model.model.model.language_model.layers.{layer}.{block}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none", "use_rslora": False,
              "target_modules": [n for names in PROJECTIONS.values() for n in names]}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def run(path: Path, dtype: str, reqs, loras, repeats: int, **options) -> tuple[float, int]:
    from fovea import LLM, SamplingParams

    conversations, _, caps = reqs
    llm = LLM(str(path), dtype=dtype, max_model_len=1024, max_num_seqs=len(conversations),
              kv_cache_memory_bytes=2 << 30, **options)
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    # the warm-up reads the first two requests' adapters
    seconds, useful, _ = time_offline(llm, "chat", chats(reqs), params, repeats, lora_request=loras)
    del llm
    gc.collect()
    return seconds, useful


def main() -> None:
    from fovea import LoRARequest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{MAX_PIXELS}", MAX_PIXELS)
    adapters = [LoRARequest(f"adapter{i}", i, str(write_adapter(CACHE / f"lora-r{args.rank}-{i}", path, args.rank, i)))
                for i in range(1, 5)]
    reqs = requests(args.num_requests)
    n = args.num_requests
    print(f"{n} requests, {sum(reqs[2])} useful output tokens, {args.dtype}, rank {args.rank}, {args.threads} "
          f"threads, best of {args.repeats} run(s) each")
    runs = {
        "base": ([None] * n, {}),
        "lora-idle": ([None] * n, dict(enable_lora=True, max_loras=4, max_lora_rank=args.rank)),
        "lora-mixed": ([adapters[i % 4] for i in range(n)], dict(enable_lora=True, max_loras=4,
                                                                 max_lora_rank=args.rank)),
    }
    base = None
    for name, (loras, options) in runs.items():
        seconds, useful = run(path, args.dtype, reqs, loras, args.repeats, **options)
        rate = useful / seconds
        base = base or rate
        print(f"  {name:10s} {rate:8.1f} tok/s  ({seconds:.1f} s)  {rate / base:.2f}x base", flush=True)


if __name__ == "__main__":
    main()
