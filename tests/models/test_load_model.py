"""Loading for inference (`load_model`): every linear layer gets its method as its weights are filled, and
`state_dict()` of the loaded model gives back the checkpoint's tensors bit for bit, whichever method runs."""
from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

from fovea.kernels import amx_linear, bf16_linear, rows_linear
from fovea.kernels.runtime import cpu_has_amx
from fovea.layers import linear_methods
from fovea.layers.linear import LinearBase, PackedLinear, onednn_linear_available
from fovea.models.registry import resolve_model_class
from fovea.models.weights import load_model, map_checkpoint_name
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.qwen2_5_vl import build_tiny_qwen2

# method -> the selection's inputs turned off to make it the one chosen (where the CPU and torch allow it at all);
# the in-place one runs every bfloat16 layer (IN_PLACE_LAYERS = "all")
METHODS = {"dense": ["onednn_linear_available"],
           "onednn": ["amx_linear_supports", "bf16_linear_supports", "rows_linear_supports"],
           "avx512-bf16": ["amx_linear_supports", "rows_linear_supports"],
           "avx512-bf16-rows": ["amx_linear_supports"], "amx": []}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("load_model")
    return {"blip2": build_tiny_blip2(root / "blip2", seed=0),
            "qwen2": build_tiny_qwen2(root / "qwen2", tie_word_embeddings=False)}


def _load(model_dir, dtype):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    return load_model(resolve_model_class(config.architectures), config, model_dir, dtype)


# the methods that take float32 weights too (the others are bfloat16 kernels: no float32 case is generated)
FLOAT32_METHODS = ("dense", "onednn")


@pytest.mark.parametrize("family", ["blip2", "qwen2"])
@pytest.mark.parametrize("method,dtype", [(method, dtype) for method in METHODS
                                          for dtype in (torch.float32, torch.bfloat16)
                                          if dtype == torch.bfloat16 or method in FLOAT32_METHODS],
                         ids=lambda value: str(value).removeprefix("torch."))
def test_state_dict_gives_back_the_checkpoint(checkpoints, family, dtype, method, monkeypatch):
    if method != "dense" and not onednn_linear_available():
        pytest.skip("oneDNN is not in this torch build")
    if method == "amx" and not amx_linear.available():
        pytest.skip("the AMX kernel runs bfloat16 on CPUs with AMX-BF16; this one has none")
    if method == "avx512-bf16" and (not bf16_linear.available() or cpu_has_amx()):
        pytest.skip("the AVX-512 BF16 kernel runs bfloat16 on CPUs with AVX-512 BF16 and without AMX")
    if method == "avx512-bf16-rows" and (not rows_linear.available() or cpu_has_amx()):
        pytest.skip("the in-place AVX-512 BF16 kernel runs bfloat16 on CPUs with AVX-512 BF16 and without AMX")
    for name in METHODS[method]:
        monkeypatch.setattr(linear_methods, name, lambda *args: False)
    monkeypatch.setattr(linear_methods, "IN_PLACE_LAYERS", "all")
    model, num_packed = _load(checkpoints[family], dtype)
    methods = {m.method.name for m in model.modules() if isinstance(m, LinearBase)}
    if method in ("amx", "avx512-bf16", "avx512-bf16-rows"):  # other shapes, BLIP-2's float32 Q-Former: oneDNN
        assert method in methods and methods <= {method, "onednn"}
    else:
        assert methods == {method}
    assert (num_packed > 0) == (method != "dense")
    if method != "dense":  # the stacked dense weights went: only the packed form (or the projections) is held
        assert not any(n.endswith("qkv_proj.weight") for n, _ in model.named_parameters())

    state = model.state_dict()
    file = load_file(str(checkpoints[family] / "model.safetensors"))
    seen = set()
    for name, tensor in file.items():
        target = map_checkpoint_name(model, name)
        if target is None:
            continue
        got = state[target.param]
        if target.shard is not None:  # a packed layer: its rows for this shard
            layer = model.get_submodule(target.param.rsplit(".", 1)[0])
            assert isinstance(layer, PackedLinear)
            got = got.narrow(0, layer.shard_offsets[target.shard], layer.shard_sizes[target.shard])
        assert got.dtype == state[target.param].dtype
        assert torch.equal(got, tensor.to(got.dtype)), name  # bit-exact (dtype conversion is deterministic)
        seen.add(target.param)
    tied = {"language_model.lm_head.weight", "lm_head.weight"} & set(state) - seen
    assert set(state) - seen == tied  # every entry is a checkpoint tensor (a tied head: its embedding's)
    for name in tied:
        assert torch.equal(state[name], state[name.replace("lm_head", "model.decoder.embed_tokens")])


def test_tied_head_keeps_the_embedding_dense_and_packs_its_own_copy(checkpoints):
    if not onednn_linear_available():
        pytest.skip("oneDNN is not in this torch build")
    model, _ = _load(checkpoints["blip2"], torch.float32)
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight
    assert lm.lm_head.method.name == "onednn" and hasattr(lm.lm_head, "packed_weight")


def test_a_missing_shard_of_a_packed_layer_is_named(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import save_file
    src = checkpoints["qwen2"]
    shutil.copytree(src, tmp_path / "ckpt")
    tensors = load_file(str(src / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor.*'model\.layers\.1\.mlp\.up_proj\.weight'"):
        _load(tmp_path / "ckpt", torch.float32)
