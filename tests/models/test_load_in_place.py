"""Layers that run from the checkpoint's own pages (`BF16RowsLinearMethod`, `IN_PLACE_LAYERS`): a bfloat16
checkpoint's language-model weights stay views of the mapped file (no copy), compute what the panel-packed layers
compute (bfloat16 tolerance: a different summation order), give back the file's tensors bit for bit, whatever the
file layout (stacked projections arriving in any order, from two files; a tied `lm_head` reading the embedding's
tensor); the mapping lives exactly as long as the model; a write into such a weight changes the model and never
the file (nor kills the process); and the KV cache's budget leaves the file pages the weights live in alone."""
from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fovea.kernels import rows_linear
from fovea.kernels.runtime import cpu_has_amx
from fovea.layers import linear_methods
from fovea.layers.linear import LinearBase, PackedLinear
from fovea.layers.linear_methods import AUTO_IN_PLACE_LAYERS, BF16RowsLinearMethod, in_place_layers
from fovea.models import safetensors_mmap
from fovea.models.registry import resolve_model_class
from fovea.models.weights import checkpoint_float_dtype, file_backed_bytes, load_model, map_checkpoint_name
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.qwen2_5_vl import build_tiny_qwen2

pytestmark = pytest.mark.skipif(not rows_linear.available() or cpu_has_amx(),
                                reason="the in-place kernel runs on CPUs with AVX-512 BF16 and without AMX")


def bfloat16_copy(src: Path, dst: Path, second_file: tuple[str, ...] = ()) -> Path:
    """`src` with its floating-point tensors in bfloat16 (as real checkpoints are); the tensors whose names
    contain one of `second_file` go into a second file (a sharded checkpoint with an index), the rest first."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = {name: t.to(torch.bfloat16) if t.is_floating_point() else t
               for name, t in load_file(str(src / "model.safetensors")).items()}
    if not second_file:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst
    files = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name, tensor in tensors.items():
        files[list(files)[any(part in name for part in second_file)]][name] = tensor
    for file_name, part in files.items():
        save_file(part, str(dst / file_name), metadata={"format": "pt"})
    weight_map = {name: file_name for file_name, part in files.items() for name in part}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("in_place")
    blip2 = build_tiny_blip2(root / "blip2_f32", seed=0, vision_hidden=64, text_hidden=64)
    qwen2 = build_tiny_qwen2(root / "qwen2_f32", tie_word_embeddings=True)
    return {"blip2": bfloat16_copy(blip2, root / "blip2"),  # OPT: lm_head tied to the token embedding
            "blip2_f32": blip2,
            "qwen2": bfloat16_copy(qwen2, root / "qwen2"),  # tied too
            # q_proj and up_proj in the second file: qkv_proj gets k, v before q; gate_up gets gate first
            "qwen2_two_files": bfloat16_copy(qwen2, root / "qwen2_two", second_file=("q_proj", "up_proj"))}


def load(model_dir: Path, policy: str):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with in_place_layers(policy):
        model, _ = load_model(resolve_model_class(config.architectures), config, model_dir, torch.bfloat16)
    return model


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges where `path` is mapped into this process (/proc/self/maps)."""
    gc.collect()
    with open("/proc/self/maps") as f:
        return [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f if str(path) in line]


def lies_in(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= tensor.data_ptr() and tensor.data_ptr() + tensor.nbytes <= hi for lo, hi in ranges)


def linear_layers(model) -> dict[str, LinearBase]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearBase)}


def file_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return {name: t for path in sorted(model_dir.glob("*.safetensors")) for name, t in load_file(str(path)).items()}


def assert_state_dict_is_the_file(model, model_dir: Path) -> None:
    state = model.state_dict()
    for name, tensor in file_tensors(model_dir).items():
        target = map_checkpoint_name(model, name)
        if target is None:
            continue
        got = state[target.param]
        if target.shard is not None:
            layer = model.get_submodule(target.param.rsplit(".", 1)[0])
            got = got.narrow(0, layer.shard_offsets[target.shard], layer.shard_sizes[target.shard])
        assert torch.equal(got, tensor.to(got.dtype)), name


def assert_layers_agree(model, reference, rows: int = 5) -> None:
    """Every linear layer of `model` computes what the same layer of `reference` does, within bfloat16 rounding
    (both sum in float32 and round once; only the order differs)."""
    g = torch.Generator().manual_seed(0)
    theirs = linear_layers(reference)
    with torch.inference_mode():
        for name, layer in linear_layers(model).items():
            x = torch.randn(rows, layer.in_features, generator=g).to(layer.params_dtype)
            got, expected = layer(x).float(), theirs[name](x).float()
            assert (got - expected).abs().max() <= 0.01 * expected.abs().max() + 1e-3, name


@pytest.mark.parametrize("family", ["blip2", "qwen2"])
def test_the_language_model_runs_from_the_file_and_the_encoders_pack(checkpoints, family):
    model_dir = checkpoints[family]
    model = load(model_dir, "language_model")
    ranges = mapped_ranges(model_dir / "model.safetensors")
    assert ranges  # the file stays mapped: the weights live there
    in_place = 0
    for name, layer in linear_layers(model).items():
        if layer.is_language_model:
            assert isinstance(layer.method, BF16RowsLinearMethod), name
            assert all(lies_in(source, ranges) for source in layer.rows_sources), name  # not a copy
            assert layer.extra_repr().split("method=")[1].startswith("avx512-bf16-rows(file)")
            in_place += 1
        else:  # BLIP-2's vision tower, Q-Former (float32) and projector
            assert not isinstance(layer.method, BF16RowsLinearMethod), name
    assert in_place >= 2 * 4 + 1
    lm = model.language_model if family == "blip2" else model
    head = lm.lm_head
    embed = lm.get_input_embeddings()
    # the tied head reads the embedding's tensor itself, which stays in the file: one copy, counted once
    assert head.weight is embed.weight and head.rows_sources[0].data_ptr() == embed.weight.data_ptr()
    assert lies_in(embed.weight, ranges)
    # nothing else stays in the file (norms, other embeddings are copied out): the in-place layers' weights, and
    # their biases where the file holds them in bfloat16 (OPT's)
    kept = {(t.data_ptr(), t.nbytes) for layer in linear_layers(model).values() if layer.is_language_model
            for t in (*layer.rows_sources, layer.bias) if t is not None and lies_in(t, ranges)}
    assert file_backed_bytes(model) == sum(nbytes for _, nbytes in kept)
    assert_state_dict_is_the_file(model, model_dir)
    assert_layers_agree(model, load(model_dir, "none"))


def test_every_policy_names_its_layers(checkpoints):
    model_dir = checkpoints["blip2"]
    for policy, expected in (("none", set()), ("language_model", {True}), ("encoders", {False}),
                             ("all", {True, False})):
        model = load(model_dir, policy)
        runs = {layer.is_language_model for layer in linear_layers(model).values()
                if isinstance(layer.method, BF16RowsLinearMethod)}
        assert runs == expected, policy  # "all": the vision tower's and projector's bfloat16 layers too
        assert_state_dict_is_the_file(model, model_dir)
        if policy in ("encoders", "all"):
            assert_layers_agree(model, load(model_dir, "none"))
    with pytest.raises(ValueError, match="in-place layer policy 'encoder'; allowed: 'language_model', 'encoders', "
                                         "'all', 'none'"):
        with in_place_layers("encoder"):
            pass


def test_stacked_projections_from_two_files_in_any_order(checkpoints):
    """q_proj / up_proj come from the second file, after k, v / gate: each projection stays a view of its own
    file, in output order, and the layer computes and saves exactly what the one-file checkpoint's does."""
    model_dir = checkpoints["qwen2_two_files"]
    model = load(model_dir, "language_model")
    first = mapped_ranges(model_dir / "model-00001-of-00002.safetensors")
    second = mapped_ranges(model_dir / "model-00002-of-00002.safetensors")
    qkv = model.model.layers[0].self_attn.qkv_proj
    gate_up = model.model.layers[0].mlp.gate_up_proj
    assert isinstance(qkv, PackedLinear) and "weight" not in dict(qkv.named_parameters())
    assert [lies_in(s, second) for s in qkv.rows_sources] == [True, False, False]  # q, k, v
    assert [lies_in(s, first) for s in qkv.rows_sources] == [False, True, True]
    assert [lies_in(s, second) for s in gate_up.rows_sources] == [False, True]  # gate, up
    assert_state_dict_is_the_file(model, model_dir)
    one_file = load(checkpoints["qwen2"], "language_model")
    x = torch.randn(3, qkv.in_features, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.inference_mode():
        assert torch.equal(qkv(x), one_file.model.layers[0].self_attn.qkv_proj(x))
        assert torch.equal(gate_up(x), one_file.model.layers[0].mlp.gate_up_proj(x))


def test_the_mapping_lives_exactly_as_long_as_the_model(checkpoints):
    """The loader has closed the file (`SafetensorsFile.close` only drops its hold: `mmap.close()` would unmap
    the pages under the weights); the model still runs from them, and they go with it."""
    model_dir = checkpoints["qwen2"]
    model = load(model_dir, "language_model")
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(2)).bfloat16()
    expected = torch.nn.functional.linear(x.float(), layer.weight.float()).bfloat16()
    gc.collect()
    assert mapped_ranges(model_dir / "model.safetensors")
    with torch.inference_mode():
        assert (layer(x).float() - expected.float()).abs().max() <= 0.01 * expected.float().abs().max()
    del layer, model
    assert mapped_ranges(model_dir / "model.safetensors") == []


_WRITE_CHILD = r"""
import hashlib, json, sys
import torch, transformers
from fovea.layers.linear_methods import in_place_layers
from fovea.models.registry import resolve_model_class
from fovea.models.weights import load_model

model_dir = sys.argv[1]
path = model_dir + "/model.safetensors"
digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
config = transformers.AutoConfig.from_pretrained(model_dir)
with in_place_layers("language_model"):
    model, _ = load_model(resolve_model_class(config.architectures), config, model_dir, torch.bfloat16)
down = model.model.layers[0].mlp.down_proj
x = torch.randn(3, down.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
with torch.inference_mode():
    before = down(x)
    head_before = model.lm_head(x[:, :model.lm_head.in_features])
with torch.no_grad():
    down.weight.mul_(2)  # a weight perturbed in place (exact in bfloat16: the output doubles exactly)
    model.model.embed_tokens.weight[5].zero_()  # the tied embedding: the head's row 5 too
with torch.inference_mode():
    after = down(x)
    head_after = model.lm_head(x[:, :model.lm_head.in_features])
print(json.dumps({
    "doubled": bool(torch.equal(after, before * 2)),
    "row5_zero": bool((head_after[:, 5] == 0).all()),
    "others_same": bool(torch.equal(head_after[:, :5], head_before[:, :5])),
    "file_unchanged": hashlib.sha256(open(path, "rb").read()).hexdigest() == digest,
    "method": down.extra_repr().split("method=")[1].split(",")[0],
}))
"""


def test_a_write_into_an_in_place_weight_changes_the_model_not_the_file(checkpoints):
    """In a child process: with a read-only mapping this write would end it (SIGSEGV)."""
    result = subprocess.run([sys.executable, "-c", _WRITE_CHILD, str(checkpoints["qwen2"])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"doubled": True, "row5_zero": True, "others_same": True, "file_unchanged": True,
                    "method": "avx512-bf16-rows(file)"}


def test_a_read_only_mapping_keeps_nothing(checkpoints, monkeypatch):
    """Under strict overcommit the copy-on-write mapping may be refused: the file is mapped read-only and every
    tensor is copied out (the layers run in place from memory of their own), so no write can meet it."""
    import mmap

    monkeypatch.setattr(safetensors_mmap, "_map", lambda f: (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ),
                                                             False))
    model_dir = checkpoints["qwen2_two_files"]
    model = load(model_dir, "language_model")
    for path in model_dir.glob("*.safetensors"):
        assert mapped_ranges(path) == []
    assert file_backed_bytes(model) == 0
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.method, BF16RowsLinearMethod) and "(memory)" in repr(qkv)
    assert_state_dict_is_the_file(model, model_dir)


def test_the_kv_budget_leaves_the_in_place_weights_resident(checkpoints, monkeypatch):
    """MemAvailable counts the page cache the weights run from: the KV budget takes their bytes out first."""
    from fovea import LLM
    from fovea.worker import model_runner

    llm = LLM(str(checkpoints["qwen2"]), dtype="bfloat16", max_model_len=64, num_kv_blocks=8,
              in_place_weights="language_model")
    runner = llm.llm_engine.runner
    in_file = runner.file_backed_weight_bytes
    assert in_file == file_backed_bytes(runner.model) > 0
    per_block = runner.kv_bytes_per_block()
    available = in_file + 40 * per_block
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: available)
    monkeypatch.setattr(runner, "profile_peak_bytes", lambda *args: 0)
    monkeypatch.setattr(runner.config, "num_kv_blocks", None)
    monkeypatch.setattr(runner.config, "memory_utilization", 0.5)
    assert runner.determine_num_kv_blocks(64, 64, []) == 20  # (available - in_file) * 0.5, not available * 0.5
    with pytest.raises(ValueError, match="room for 0 blocks"):
        monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: in_file)
        runner.determine_num_kv_blocks(64, 64, [])


def test_the_policy_is_read_where_a_layer_is_chosen(monkeypatch):
    monkeypatch.setattr(linear_methods, "IN_PLACE_LAYERS", "everything")
    layer = linear_methods.nn.Linear(4, 4)  # any module: the policy is checked before the layer is looked at
    with pytest.raises(ValueError, match="IN_PLACE_LAYERS = 'everything'; allowed"):
        linear_methods.runs_in_place(layer)


def mapped_in(pid: int, path: Path) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any(str(path) in line for line in f)


@pytest.mark.parametrize("backend", ["uni", "mp"])
def test_the_engine_option_chooses_the_layers_in_every_worker(checkpoints, backend):
    """`EngineConfig.in_place_weights` reaches the process that loads the model: in a spawned worker ("mp") the
    file stays mapped exactly when the option keeps layers in it (a packed load closes and unmaps it); both serve."""
    from fovea import LLM, SamplingParams

    model_dir = checkpoints["qwen2"]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    mapped = {}
    for policy in ("none", "all"):
        llm = LLM(str(model_dir), dtype="bfloat16", max_model_len=64, num_kv_blocks=16, in_place_weights=policy,
                  distributed_executor_backend=backend)
        executor = llm.llm_engine.engine_core.executor
        if backend == "mp":
            mapped[policy] = mapped_in(executor.workers[0].process.pid, model_dir / "model.safetensors")
        else:
            layer = executor.runner.model.model.layers[0].mlp.down_proj
            mapped[policy] = isinstance(layer.method, BF16RowsLinearMethod)
        assert len(llm.generate(["one two three"], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
        executor.shutdown()
        del llm, executor
        gc.collect()
    assert mapped == {"none": False, "all": True}


def test_the_engine_option_names_what_is_allowed(checkpoints):
    from fovea import LLM

    with pytest.raises(ValueError, match="in_place_weights=.encoder. is not supported; choose one of auto, none, "
                                         "language_model, encoders, all"):
        LLM(str(checkpoints["qwen2"]), in_place_weights="encoder")


@pytest.mark.parametrize("huge_pages", ["language_model", "none", "auto"])
def test_the_huge_pages_option_reaches_the_load(checkpoints, huge_pages):
    """`EngineConfig.huge_pages` chooses the language model's packed weights' pages where the model is loaded
    (`fovea.models.weights.place_layers`; the encoders' layers never get them); "auto" as this machine's host
    decides (`fovea.models.weights.huge_page_policy`)."""
    from fovea import LLM
    from fovea.kernels.panels import host_reclaims_free_memory

    llm = LLM(str(checkpoints["blip2"]), max_model_len=64, num_kv_blocks=8, in_place_weights="none",
              huge_pages=huge_pages, packed_weights_cache="off")
    runner = llm.llm_engine.runner
    expected = {"auto": "none" if host_reclaims_free_memory() else "language_model"}.get(huge_pages, huge_pages)
    if huge_pages == "auto":  # the packed weights cache (on by default) writes the 2 MiB pages once: taken anyway
        cached = LLM(str(checkpoints["blip2"]), max_model_len=64, num_kv_blocks=8, in_place_weights="none")
        assert cached.llm_engine.runner.packed_cache is not None
        assert cached.llm_engine.runner.huge_pages == "language_model"
        del cached
    assert runner.huge_pages == expected
    layers = linear_layers(runner.model)
    lm = {layer.huge_pages for layer in layers.values() if layer.is_language_model}
    assert lm == {expected == "language_model"}
    assert {layer.huge_pages for layer in layers.values() if not layer.is_language_model} == {False}
    with pytest.raises(ValueError, match="huge_pages='all' is not supported; choose one of auto, language_model, none"):
        LLM(str(checkpoints["blip2"]), huge_pages="all")


@pytest.mark.parametrize("auto", sorted({"language_model", "encoders", "all", AUTO_IN_PLACE_LAYERS}))
@pytest.mark.parametrize("name,dtype,in_file", [("blip2", "bfloat16", True), ("blip2_f32", "bfloat16", False),
                                                ("blip2", "float32", False)])
def test_auto_runs_in_place_where_the_file_holds_the_served_dtype(checkpoints, name, dtype, in_file, auto,
                                                                  monkeypatch):
    """The default, whatever policy `AUTO_IN_PLACE_LAYERS` names: a float32 file served in bfloat16 is converted
    anyway, and its copies pack."""
    from fovea import LLM

    monkeypatch.setattr(linear_methods, "AUTO_IN_PLACE_LAYERS", auto)
    expected = auto if in_file else "none"
    # the packed weights cache off: its mapped panels would count as file-backed weights too
    llm = LLM(str(checkpoints[name]), dtype=dtype, max_model_len=64, num_kv_blocks=8, packed_weights_cache="off")
    runner = llm.llm_engine.runner
    assert runner.in_place_weights == expected
    rows = {layer.is_language_model for layer in linear_layers(runner.model).values()
            if isinstance(layer.method, BF16RowsLinearMethod)}
    assert rows == {"none": set(), "language_model": {True}, "encoders": {False}, "all": {True, False}}[expected]
    assert (runner.file_backed_weight_bytes > 0) == (expected != "none")


def test_the_checkpoint_dtype_is_where_most_floating_point_bytes_are(tmp_path):
    cases = {"bf16": ({"a": (100, torch.bfloat16), "b": (40, torch.float32), "ids": (1000, torch.int64)},
                      torch.bfloat16),  # 200 bytes vs 160 (integers do not count)
             "f32": ({"a": (100, torch.bfloat16), "b": (60, torch.float32)}, torch.float32),  # 200 vs 240
             "ints": ({"ids": (10, torch.int64)}, None)}
    for name, (tensors, expected) in cases.items():
        (tmp_path / name).mkdir()
        save_file({k: torch.zeros(n, dtype=dtype) for k, (n, dtype) in tensors.items()},
                  str(tmp_path / name / "model.safetensors"))
        assert checkpoint_float_dtype(tmp_path / name) == expected, name
