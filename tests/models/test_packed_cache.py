"""The packed weights cache (`fovea.models.packed_cache`, `EngineConfig.packed_weights_cache`): a first load packs
every panel layer into a file of its own and runs from it; a second load maps the files and reads nothing of the
checkpoint's weights for them; both give the model a load without the cache gives (the checkpoint's tensors bit for
bit, the same greedy tokens and logprobs from the engine); a file is complete under its final name; a write into a
weight never reaches the file; a changed or deleted checkpoint's entry goes, nothing else in the directory does; a
disk without room packs in memory with one warning."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from fovea.layers.linear import LinearBase
from fovea.layers.linear_methods import PanelLinearMethod, in_place_layers
from fovea.models import packed_cache
from fovea.models.packed_cache import FLUSHER, PackedWeightsCache, checkpoint_key, prune
from fovea.models.registry import resolve_model_class
from fovea.models.safetensors_mmap import lies_in_a_file
from fovea.models.weights import load_model
from tests.models.test_load_in_place import bfloat16_copy
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.qwen2_5_vl import build_tiny_qwen2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packed_cache")
    qwen2 = build_tiny_qwen2(root / "qwen2_f32", tie_word_embeddings=False)
    blip2 = build_tiny_blip2(root / "blip2_f32", seed=0, vision_hidden=64, text_hidden=64)
    return {"qwen2": bfloat16_copy(qwen2, root / "qwen2"),  # stacked qkv / gate_up: packed shard by shard
            "blip2": bfloat16_copy(blip2, root / "blip2")}  # OPT's lm_head tied to the token embedding


def load(model_dir: Path, cache: PackedWeightsCache | None):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with in_place_layers("none"):
        model, _ = load_model(resolve_model_class(config.architectures), config, model_dir, torch.bfloat16,
                              packed_cache=cache)
    FLUSHER.drain()
    return model


def panel_layers(model) -> dict[str, LinearBase]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, LinearBase) and isinstance(m.method, PanelLinearMethod)}


@pytest.mark.parametrize("name", ["qwen2", "blip2"])
def test_a_second_load_maps_what_the_first_packed(checkpoints, tmp_path, name):
    model_dir = checkpoints[name]
    reference = load(model_dir, None)
    first_cache = PackedWeightsCache.open(tmp_path, model_dir, torch.bfloat16)
    first = load(model_dir, first_cache)
    layers = panel_layers(first)
    assert len(layers) > 5 and len(layers) == len(panel_layers(reference))
    assert (first_cache.num_written, first_cache.num_mapped) == (len(layers), 0)
    files = sorted(p.name for p in first_cache.directory.glob("*.panels"))
    assert len(files) == len(layers)  # every file renamed into place once on disk; nothing temporary is left
    assert not list(first_cache.directory.glob("*.tmp-*"))
    for layer_name, layer in layers.items():  # the layer runs from its file's pages, exactly the file's size
        assert lies_in_a_file(layer.packed_weight) and "(cache)" in repr(layer)
        (path,) = first_cache.directory.glob(f"{layer_name}.*.panels")
        assert path.stat().st_size == layer.packed_weight.nbytes

    second_cache = PackedWeightsCache.open(tmp_path, model_dir, torch.bfloat16)
    assert second_cache.directory == first_cache.directory
    second = load(model_dir, second_cache)
    assert (second_cache.num_written, second_cache.num_mapped) == (0, len(layers))
    assert second_cache.bytes_mapped == sum(layer.packed_weight.nbytes for layer in layers.values())
    expected = reference.state_dict()
    for model in (first, second):  # the checkpoint's tensors, bit for bit
        got = model.state_dict()
        assert got.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), key
    for layer_name, layer in panel_layers(second).items():
        assert torch.equal(layer.packed_weight, panel_layers(reference)[layer_name].packed_weight)


def test_a_write_into_a_cached_weight_never_reaches_the_file(checkpoints, tmp_path):
    model_dir = checkpoints["qwen2"]
    load(model_dir, PackedWeightsCache.open(tmp_path, model_dir, torch.bfloat16))
    cache = PackedWeightsCache.open(tmp_path, model_dir, torch.bfloat16)
    model = load(model_dir, cache)
    layer = model.model.layers[0].mlp.down_proj
    (path,) = cache.directory.glob("model.layers.0.mlp.down_proj.*.panels")
    before = path.read_bytes()
    layer.packed_weight.add_(1.0)
    assert path.read_bytes() == before
    again = load(model_dir, PackedWeightsCache.open(tmp_path, model_dir, torch.bfloat16))
    assert not torch.equal(again.model.layers[0].mlp.down_proj.packed_weight, layer.packed_weight)


def test_a_file_of_the_wrong_size_is_packed_again(checkpoints, tmp_path):
    model_dir = checkpoints["qwen2"]
    cache = PackedWeightsCache.open(tmp_path, model_dir, torch.bfloat16)
    reference = load(model_dir, cache)
    (path,) = cache.directory.glob("model.layers.1.self_attn.qkv_proj.*.panels")
    size = path.stat().st_size
    short = path.with_name("short")  # a file cut short (not one of ours: ours are renamed into place whole);
    short.write_bytes(path.read_bytes()[:size // 2])  # a new inode: `reference` still maps the old one
    short.rename(path)
    cache = PackedWeightsCache.open(tmp_path, model_dir, torch.bfloat16)
    model = load(model_dir, cache)
    assert (cache.num_written, path.stat().st_size) == (1, size)
    assert torch.equal(model.model.layers[1].self_attn.qkv_proj.packed_weight,
                       reference.model.layers[1].self_attn.qkv_proj.packed_weight)


def test_stale_entries_go_and_nothing_else(checkpoints, tmp_path):
    root = tmp_path / "cache"
    model_dir = tmp_path / "checkpoint"
    model_dir.mkdir()
    for item in checkpoints["qwen2"].iterdir():
        (model_dir / item.name).write_bytes(item.read_bytes())
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    first = PackedWeightsCache.open(root, model_dir, torch.bfloat16)
    other = PackedWeightsCache.open(root, other_dir, torch.bfloat16)
    not_ours = [root / "notes", root / ("0" * 31 + "g")]  # a directory the user keeps there, a name not a key
    for path in not_ours:
        path.mkdir()
    dead = first.directory / f"x.panels{packed_cache._TMP}999999999-1"  # a dead process's half-written file
    live = first.directory / f"y.panels{packed_cache._TMP}{os.getpid()}-1"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")

    assert prune(root, keep=None) == [dead]
    assert live.exists() and first.directory.exists() and other.directory.exists()

    time.sleep(0.05)
    (model_dir / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())  # rewritten
    assert checkpoint_key(model_dir, torch.bfloat16) != first.directory.name
    for item in other_dir.iterdir():
        item.unlink()
    other_dir.rmdir()  # deleted
    again = PackedWeightsCache.open(root, model_dir, torch.bfloat16)
    assert not first.directory.exists() and not other.directory.exists()
    assert again.directory.exists() and all(path.exists() for path in not_ours)
    assert json.loads((again.directory / "meta.json").read_text())["model"] == str(model_dir.resolve())


def test_the_key_follows_the_checkpoint_and_dtype(checkpoints, tmp_path):
    model_dir = checkpoints["qwen2"]
    key = checkpoint_key(model_dir, torch.bfloat16)
    assert key == checkpoint_key(str(model_dir) + "/", torch.bfloat16)
    assert key != checkpoint_key(model_dir, torch.float32)
    assert key != checkpoint_key(checkpoints["blip2"], torch.bfloat16)


_NO_ROOM_CHILD = r"""
import logging, resource, signal, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[3])
from tests.models.test_packed_cache import load, panel_layers
from fovea.models.packed_cache import PackedWeightsCache
from fovea.models.safetensors_mmap import lies_in_a_file
logging.basicConfig(level=logging.WARNING)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file past the limit: EFBIG, as a full disk gives ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
cache = PackedWeightsCache.open(Path(sys.argv[2]), Path(sys.argv[1]), torch.bfloat16)
model = load(Path(sys.argv[1]), cache)
layers = panel_layers(model)
print("written", cache.num_written, "in memory", sum(not lies_in_a_file(l.packed_weight) for l in layers.values()),
      "of", len(layers), "files", len(list(cache.directory.glob("*.panels*"))))
"""


def test_no_room_on_disk_packs_in_memory_with_one_warning(checkpoints, tmp_path):
    result = subprocess.run([sys.executable, "-c", _NO_ROOM_CHILD, str(checkpoints["qwen2"]), str(tmp_path),
                             str(Path(__file__).parents[2])], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    # the layers smaller than the limit still fit; every other one packed in memory; no file left half made
    written, in_memory, total = int(words[1]), int(words[4]), int(words[6])
    assert in_memory > 0 and written + in_memory == total and int(words[8]) == written
    warnings = [line for line in result.stderr.splitlines() if "packed weights cache" in line]
    assert len(warnings) == 1 and "no room for" in warnings[0] and "packing in memory instead" in warnings[0]


def test_the_engine_option(checkpoints, tmp_path):
    """`packed_weights_cache` reaches the load: a directory is used (and its entry's bytes are kept out of the
    KV cache's budget, as file pages), "off" packs in memory; the same greedy tokens and logprobs either way, and
    from the second start, which maps every layer."""
    from fovea import LLM, SamplingParams

    model_dir = str(checkpoints["qwen2"])
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    results = {}
    for run, option in (("off", "off"), ("first", str(tmp_path)), ("second", str(tmp_path))):
        llm = LLM(model_dir, dtype="bfloat16", max_model_len=64, num_kv_blocks=16, in_place_weights="none",
                  packed_weights_cache=option)
        runner = llm.llm_engine.runner
        out = llm.generate(["one two three", "four five"], params, use_tqdm=False)
        results[run] = [(o.outputs[0].token_ids, [sorted(step.items()) for step in o.outputs[0].logprobs])
                        for o in out]
        if option == "off":
            assert runner.packed_cache is None and runner.file_backed_weight_bytes == 0
        else:
            cache = runner.packed_cache
            assert cache.directory.parent == tmp_path
            layers = panel_layers(runner.model)
            assert (cache.num_mapped, cache.num_written) == ((len(layers), 0) if run == "second" else (0, len(layers)))
            assert runner.file_backed_weight_bytes == sum(layer.packed_weight.nbytes for layer in layers.values())
        del llm, runner
        FLUSHER.drain()  # the first start's files reach their final names in the background
    assert results["first"] == results["off"] and results["second"] == results["off"]
    with pytest.raises(ValueError, match="packed_weights_cache='' is not supported; choose 'auto', 'off' or a "
                                         "directory"):
        LLM(model_dir, packed_weights_cache="")


def test_a_cache_directory_that_cannot_be_made_packs_in_memory(checkpoints, tmp_path, caplog):
    from fovea import LLM, SamplingParams

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with caplog.at_level("WARNING", logger="fovea.models.packed_cache"):
        llm = LLM(str(checkpoints["qwen2"]), dtype="bfloat16", max_model_len=64, num_kv_blocks=16,
                  in_place_weights="none", packed_weights_cache=str(blocker / "cache"))
    runner = llm.llm_engine.runner
    assert runner.packed_cache is None and runner.file_backed_weight_bytes == 0
    assert any(f"cannot use {blocker / 'cache'}" in r.getMessage() and "packing in memory instead" in r.getMessage()
               for r in caplog.records)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    assert len(llm.generate(["one two"], params, use_tqdm=False)[0].outputs[0].token_ids) == 3


def test_auto_is_under_fovea_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FOVEA_CACHE_DIR", str(tmp_path))
    assert packed_cache.resolve_root("auto") == tmp_path / "packed-weights"
    monkeypatch.delenv("FOVEA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert packed_cache.resolve_root("auto") == tmp_path / "xdg" / "fovea" / "packed-weights"
    assert packed_cache.resolve_root("off") is None
    assert packed_cache.resolve_root("~/x") == Path.home() / "x"
