"""Model load: fovea's `load_model` vs transformers' `from_pretrained`, time and peak memory, same checkpoint.

Each side loads in a fresh process (2 threads) after importing its libraries; the figures are the wall time of
the load call and the peak resident memory it adds (VmHWM, reset just before), against the checkpoint's bytes.
fovea's figure includes repacking every linear layer for its kernel (oneDNN / AMX); transformers keeps them
dense. The page cache is warmed first (one read of the file), so neither side measures the disk.

The checkpoint is a random bfloat16 OPT (tied embeddings, like BLIP-2's language model) written by
`save_pretrained` into `CACHE`: `--layers 32` gives OPT-2.7b's shape (2.65 B parameters, 5.3 GB); the default
8 layers, 1.5 GB. `--model-dir` loads an existing checkpoint instead.

`--in-place none language_model all` loads fovea once per `fovea.layers.linear_methods.IN_PLACE_LAYERS` value (which
layers run from the checkpoint's pages instead of packed panels); each figure also gives the CPU seconds of the load
call and the anonymous memory it added (RssAnon: what was copied, the file's pages aside).

    python benchmarks/load.py [--layers 8] [--model-dir DIR] [--repeats 2] [--in-place none language_model all]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CACHE  # noqa: E402

_PRELUDE = r"""
import json, sys, time
import torch
torch.set_num_threads(2)

def status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def measure(load):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here
    before, anon = status_bytes("VmRSS"), status_bytes("RssAnon")
    start, cpu = time.perf_counter(), time.process_time()
    model = load()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": status_bytes("VmHWM") - before,
                      "after_bytes": status_bytes("VmRSS") - before, "anon_bytes": status_bytes("RssAnon") - anon}))
"""

_FOVEA = _PRELUDE + r"""
import transformers
from fovea.layers.linear import Linear, prepare_linear_layer
from fovea.models.registry import resolve_model_class
from fovea.models.weights import load_model
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
if len(sys.argv) > 2:
    from fovea.layers import linear_methods
    linear_methods.IN_PLACE_LAYERS = sys.argv[2]
warm = Linear(64, 64, dtype=torch.bfloat16)  # the kernels' libraries load here, not in the timed call
prepare_linear_layer(warm)
measure(lambda: load_model(resolve_model_class(config.architectures), config, sys.argv[1], torch.bfloat16))
"""

_TRANSFORMERS = _PRELUDE + r"""
import transformers
measure(lambda: transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16))
"""


def build_checkpoint(layers: int) -> Path:
    out = CACHE / f"load_opt2560_l{layers}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=layers, num_attention_heads=32,
                       vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2560)
    torch.manual_seed(0)
    model = OPTForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    return out


def run(script: str, model_dir: Path, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    result = subprocess.run([sys.executable, "-c", script, str(model_dir), *extra], env=env, capture_output=True,
                            text=True)
    if result.returncode:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--in-place", nargs="+", choices=["language_model", "encoders", "all", "none"],
                        help="load fovea once per IN_PLACE_LAYERS value (default: the module's)")
    args = parser.parse_args()
    model_dir = args.model_dir or build_checkpoint(args.layers)
    files = sorted(model_dir.glob("*.safetensors"))
    file_bytes = sum(p.stat().st_size for p in files)
    for path in files:  # warm the page cache
        with open(path, "rb") as f:
            while f.read(1 << 26):
                pass
    print(f"{model_dir}: {file_bytes / 1e9:.2f} GB")
    sides = [(f"fovea[{policy}]", _FOVEA, (policy,)) for policy in args.in_place or []] or [("fovea", _FOVEA, ())]
    sides.append(("transformers", _TRANSFORMERS, ()))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
    for _ in range(args.repeats):  # alternating sides: a busy machine's load changes between runs
        for name, script, extra in sides:
            runs[name].append(run(script, model_dir, *extra))
    for name, _, _ in sides:
        best = min(runs[name], key=lambda r: r["seconds"])
        times = ", ".join(f"{r['seconds']:.2f}" for r in runs[name])
        print(f"{name:>22}: {best['seconds']:.2f} s, {best['cpu_seconds']:.2f} CPU-s (runs: {times}), "
              f"peak +{best['peak_bytes'] / 1e9:.2f} GB = {best['peak_bytes'] / file_bytes:.2f}x the file, "
              f"after +{best['after_bytes'] / 1e9:.2f} GB, anonymous +{best['anon_bytes'] / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
