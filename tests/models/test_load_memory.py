"""Loading holds one copy of the weights: in a fresh process, the resident memory that `load_model` adds
(at its peak) stays within 1.15x the checkpoint's bytes for a bfloat16 checkpoint of a few hundred MB; a whole
engine start (`LLM(...)`: load, the memory profiling pass, the KV pool sized from half the available memory)
within 1.15x plus `ENGINE_EXTRA_BYTES`. Where the language model runs from the file's pages
(`fovea.layers.linear_methods.IN_PLACE_LAYERS`), loading copies next to nothing: the process's anonymous memory
(RssAnon) and its whole resident set at their peak grow by under `MAX_IN_PLACE_GROWTH` of the file, and the
weights are views of the file.

Two copies (the memory-mapped file kept resident while the packed weights are built from it, or every weight
initialised before being overwritten and packed) would be 2x; the checkpoint here is large enough that the
libraries' own allocations (a few MB) do not decide the outcome.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from fovea.kernels import bf16_linear, rows_linear
from fovea.kernels.runtime import cpu_has_amx
from fovea.layers.linear import onednn_linear_available
from tests.oracle.tokenizer import build_tokenizer

MAX_GROWTH = 1.15
MAX_IN_PLACE_GROWTH = 0.25
ENGINE_EXTRA_BYTES = 96 << 20
"""What an engine start adds beyond the weights: the profiling pass's activations (256 tokens through a 1024-wide
model, ~20 MB), the tokenizer, the KV blocks the profiling pass writes. Not the KV pool: its pages are resident
only once written (`fovea.worker.memory.lazily_zeroed`); zero-filled eagerly it alone would be GBs here."""

_CHILD = r"""
import json, sys
import torch, transformers
from fovea.layers.linear import Linear, prepare_linear_layer
from fovea.models.registry import resolve_model_class
from fovea.models.weights import load_model

torch.set_num_threads(2)
model_dir = sys.argv[1]
import fovea.layers.linear_methods
if sys.argv[2] == "dense":  # no packed method: the layers keep the weights as loaded
    fovea.layers.linear_methods.onednn_linear_available = lambda: False
if sys.argv[2] == "packed":  # every layer packs its panels (or oneDNN's layout)
    fovea.layers.linear_methods.IN_PLACE_LAYERS = "none"
if sys.argv[2] == "in_place":  # the language model runs from the file's pages
    fovea.layers.linear_methods.IN_PLACE_LAYERS = "language_model"
config = transformers.AutoConfig.from_pretrained(model_dir)
model_cls = resolve_model_class(config.architectures)
with torch.inference_mode():  # load the kernels' libraries first: their code is not the model's memory
    warm = Linear(64, 64, dtype=torch.bfloat16)
    prepare_linear_layer(warm)
    warm(torch.zeros(2, 64, dtype=torch.bfloat16))

def status_bytes(field):  # VmRSS now, VmHWM its peak
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

# the peak from here on. Not ru_maxrss: after fork + exec it starts at the parent's peak (pytest's, here)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_bytes("VmRSS")
anon_before = status_bytes("RssAnon")
file_backed = 0
if sys.argv[2].startswith("cache"):  # every layer packs its panels, into the packed weights cache's files
    fovea.layers.linear_methods.IN_PLACE_LAYERS = "none"
    from fovea.models.packed_cache import FLUSHER, PackedWeightsCache
    from fovea.models.weights import file_backed_bytes
    cache = PackedWeightsCache.open(sys.argv[3], model_dir, torch.bfloat16)
    model, num_packed = load_model(model_cls, config, model_dir, torch.bfloat16, packed_cache=cache)
    FLUSHER.drain()
    file_backed = file_backed_bytes(model)
    assert (cache.num_mapped, cache.num_written) == ((num_packed, 0) if sys.argv[2] == "cache_warm" else
                                                     (0, num_packed)), cache.summary()
elif sys.argv[2] == "engine":
    from fovea import LLM
    llm = LLM(model_dir, dtype="bfloat16", max_model_len=256, num_threads=2)
    num_packed = llm.llm_engine.runner.num_prepacked_linears
    out = llm.generate(["hello world"], use_tqdm=False)  # the engine runs
    assert len(out[0].outputs[0].token_ids) > 0
else:
    model, num_packed = load_model(model_cls, config, model_dir, torch.bfloat16)
    from fovea.models.weights import file_backed_bytes
    file_backed = file_backed_bytes(model)
print(json.dumps({"before": before, "peak": status_bytes("VmHWM"), "after": status_bytes("VmRSS"),
                  "anon_growth": status_bytes("RssAnon") - anon_before, "file_backed": file_backed,
                  "num_packed": num_packed}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 12-layer OPT 1024 wide, bfloat16, lm_head not tied: 169 M parameters, 338 MB, as `save_pretrained`
    writes it. Shaped like a real checkpoint: no single tensor is a large part of it (each is read and repacked
    while the weights before it are held, so the largest one's size comes on top for a moment).

    Untied, because a tied lm_head is packed into a copy of its own (the embedding keeps the dense weight):
    that copy is what loading adds beyond the file then, vocab x hidden (3% of BLIP-2 OPT-2.7b's bytes)."""
    out = tmp_path_factory.mktemp("load_memory")
    config = OPTConfig(hidden_size=1024, ffn_dim=4096, num_hidden_layers=12, num_attention_heads=16,
                       vocab_size=8192, max_position_embeddings=512, word_embed_proj_dim=1024,
                       tie_word_embeddings=False)
    torch.manual_seed(0)
    model = OPTForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    build_tokenizer(out)
    return out


def run_child(checkpoint: Path, mode: str, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _CHILD, str(checkpoint), mode, *extra],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["packed", "dense", "engine"])
def test_loading_adds_at_most_the_checkpoint_size(checkpoint, mode):
    packed = mode != "dense"
    if packed and not onednn_linear_available():
        pytest.skip("oneDNN is not in this torch build")
    figures = run_child(checkpoint, mode)
    file_bytes = (checkpoint / "model.safetensors").stat().st_size
    growth = figures["peak"] - figures["before"]
    assert (figures["num_packed"] > 0) == packed
    allowed = MAX_GROWTH * file_bytes + (ENGINE_EXTRA_BYTES if mode == "engine" else 0)
    assert growth <= allowed, (
        f"loading a {file_bytes / 1e6:.0f} MB checkpoint added {growth / 1e6:.0f} MB at its peak "
        f"({growth / file_bytes:.2f}x; allowed {allowed / 1e6:.0f} MB)")
    # the weights are really there: resident, or (in place, engine) mapped in from the page cache
    assert figures["after"] - figures["before"] >= 0.9 * file_bytes


def test_loading_in_place_copies_next_to_nothing(checkpoint):
    if not (rows_linear.available() and not cpu_has_amx()):
        pytest.skip("the in-place kernel runs on CPUs with AVX-512 BF16 and without AMX")
    figures = run_child(checkpoint, "in_place")
    file_bytes = (checkpoint / "model.safetensors").stat().st_size
    assert figures["file_backed"] >= 0.9 * file_bytes  # every linear layer; the token embedding is copied
    assert figures["anon_growth"] < MAX_IN_PLACE_GROWTH * file_bytes, figures
    assert figures["peak"] - figures["before"] < MAX_IN_PLACE_GROWTH * file_bytes, figures


def test_the_packed_weights_cache_holds_one_copy_and_a_warm_start_copies_nothing(checkpoint, tmp_path):
    """`fovea.models.packed_cache`: the first load packs every layer into the cache's files (their page-cache
    pages are the weights, each layer's shared mapping of them dropped once packed: the resident set stays
    within 1.15x the file); the next load maps them and writes next to nothing (the token embedding, biases), as
    the in-place load."""
    if not (bf16_linear.available() or cpu_has_amx()):
        pytest.skip("the panel kernels need a CPU with AVX-512 BF16 or AMX")
    file_bytes = (checkpoint / "model.safetensors").stat().st_size
    cold = run_child(checkpoint, "cache_cold", str(tmp_path))
    assert cold["num_packed"] > 0
    assert cold["peak"] - cold["before"] <= MAX_GROWTH * file_bytes, cold
    assert cold["file_backed"] >= 0.9 * file_bytes  # every linear layer; the token embedding is not one
    warm = run_child(checkpoint, "cache_warm", str(tmp_path))
    assert warm["file_backed"] == cold["file_backed"]
    assert warm["anon_growth"] < MAX_IN_PLACE_GROWTH * file_bytes, warm
    assert warm["peak"] - warm["before"] < MAX_IN_PLACE_GROWTH * file_bytes, warm
