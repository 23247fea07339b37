"""Checkpoint loading: safetensors only, sharded or not, strict about every name and shape."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fovea.layers.attention import Attention, build_attention_metadata, forward_context
from fovea.models.blip2 import Blip2ForConditionalGeneration
from fovea.models.opt import OPTForCausalLM
from fovea.models.registry import resolve_model_class, supported_architectures
from fovea.models.weights import load_weights
from tests.oracle.blip2 import build_tiny_blip2, load_hf

QKV = "language_model.model.decoder.layers.0.self_attn.{}.weight"
VISION_QKV_BIAS = "vision_model.encoder.layers.{}.self_attn.qkv.bias"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("weights"), seed=0)


def new_model(model_dir, dtype=torch.float32) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    return resolve_model_class(config.architectures)(config).to(dtype)


def loaded(model_dir, dtype=torch.float32) -> dict[str, torch.Tensor]:
    model = new_model(model_dir, dtype)
    load_weights(model, model_dir)
    return dict(model.state_dict())


def edited_copy(src, dst, edit) -> None:
    """Copy a checkpoint dir, rewriting its model.safetensors with edit(state_dict)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_loads_every_tensor_and_packs_qkv(ckpt):
    state = loaded(ckpt)
    file = load_file(str(ckpt / "model.safetensors"))
    packed = torch.cat([file[QKV.format(p)] for p in ("q_proj", "k_proj", "v_proj")])
    torch.testing.assert_close(state[QKV.format("qkv_proj")], packed, atol=0, rtol=0)
    for name, tensor in file.items():
        if name in state:
            torch.testing.assert_close(state[name], tensor, atol=0, rtol=0)


def test_sharded_checkpoint_loads_the_same(ckpt, tmp_path):
    hf_model, _ = load_hf(ckpt)
    hf_model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    sharded, single = loaded(tmp_path), loaded(ckpt)
    assert sharded.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], atol=0, rtol=0)


def test_converts_to_the_parameter_dtype(ckpt):
    state = loaded(ckpt, torch.bfloat16)
    file = load_file(str(ckpt / "model.safetensors"))
    name = "language_projection.weight"
    assert state[name].dtype == torch.bfloat16
    torch.testing.assert_close(state[name], file[name].to(torch.bfloat16), atol=0, rtol=0)


@pytest.mark.parametrize(
    "name",
    [QKV.format("k_proj"), "vision_model.post_layernorm.weight", "qformer.encoder.layer.1.output_query.dense.bias"],
)
def test_missing_tensor_is_named(ckpt, tmp_path, name):
    edited_copy(ckpt, tmp_path / "ckpt", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor.*'{name}'"):
        load_weights(new_model(ckpt), tmp_path / "ckpt")


def test_unexpected_tensor_is_named(ckpt, tmp_path):
    name = "vision_model.encoder.layers.0.self_attn.extra.weight"
    edited_copy(ckpt, tmp_path / "ckpt", lambda t: t.update({name: torch.zeros(2)}))
    with pytest.raises(ValueError, match=f"unexpected tensor '{name}'"):
        load_weights(new_model(ckpt), tmp_path / "ckpt")


@pytest.mark.parametrize(
    "name, shape",
    [("language_projection.weight", (32, 31)), (QKV.format("v_proj"), (16, 32)), (VISION_QKV_BIAS.format(1), (64,))],
)
def test_wrong_shape_is_named(ckpt, tmp_path, name, shape):
    edited_copy(ckpt, tmp_path / "ckpt", lambda t: t.update({name: torch.zeros(shape)}))
    with pytest.raises(ValueError, match=rf"tensor '{name}'.*shape \({shape[0]},.*vs expected"):
        load_weights(new_model(ckpt), tmp_path / "ckpt")


def test_pickled_weights_are_refused(ckpt, tmp_path):
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="pickled weights.*safetensors is required"):
        load_weights(new_model(ckpt), tmp_path)


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError, match=r"BartForConditionalGeneration.*Blip2ForConditionalGeneration"):
        resolve_model_class(["BartForConditionalGeneration"])
    assert resolve_model_class(["Foo", "Blip2ForConditionalGeneration"]) is Blip2ForConditionalGeneration
    assert set(supported_architectures()) == {"Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration",
                                             "FuyuForCausalLM", "PersimmonForCausalLM",
                                             "LlamaForCausalLM", "LlavaForConditionalGeneration",
                                             "LlavaNextForConditionalGeneration", "MistralForCausalLM",
                                             "OPTForCausalLM", "Qwen2_5_VLForConditionalGeneration", "Qwen2ForCausalLM",
                                             "T5ForConditionalGeneration"}


def test_separate_q_and_v_bias_fill_the_fused_vision_bias(ckpt, tmp_path):
    """BLIP's layout before transformers fused it: q_bias and v_bias, no key bias."""

    def split(tensors):
        for i in range(2):
            bias = tensors.pop(VISION_QKV_BIAS.format(i))
            prefix = f"vision_model.encoder.layers.{i}.self_attn."
            tensors[prefix + "q_bias"], tensors[prefix + "v_bias"] = bias[:32].clone(), bias[64:].clone()

    edited_copy(ckpt, tmp_path / "ckpt", split)
    got, want = loaded(tmp_path / "ckpt"), loaded(ckpt)
    for i in range(2):
        name = VISION_QKV_BIAS.format(i)
        torch.testing.assert_close(got[name][32:64], torch.zeros(32))
        torch.testing.assert_close(got[name][:32], want[name][:32], atol=0, rtol=0)
        torch.testing.assert_close(got[name][64:], want[name][64:], atol=0, rtol=0)


def test_untied_lm_head_and_qformer_text_branch(tmp_path):
    ckpt = build_tiny_blip2(tmp_path, tie_word_embeddings=False, use_qformer_text_input=True)
    file = load_file(str(ckpt / "model.safetensors"))
    assert "language_model.lm_head.weight" in file and "qformer.encoder.layer.0.intermediate.dense.weight" in file
    state = loaded(ckpt)
    torch.testing.assert_close(state["language_model.lm_head.weight"], file["language_model.lm_head.weight"])


def test_tied_lm_head_stored_anyway_is_ignored(ckpt, tmp_path):
    embed = "language_model.model.decoder.embed_tokens.weight"
    edited_copy(ckpt, tmp_path / "ckpt", lambda t: t.update({"language_model.lm_head.weight": t[embed].clone()}))
    loaded(tmp_path / "ckpt")


def test_opt_language_model_alone(ckpt, tmp_path):
    """The BLIP-2 checkpoint's OPT saved on its own loads as OPTForCausalLM and gives transformers' logits."""
    hf_model, _ = load_hf(ckpt)
    hf_model.language_model.save_pretrained(str(tmp_path))
    model = new_model(tmp_path)
    assert isinstance(model, OPTForCausalLM)
    load_weights(model, tmp_path)
    input_ids = torch.tensor([2, 308, 29, 498, 500, 516])
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.kv_cache = (torch.zeros(8, 4, 8), torch.zeros(8, 4, 8))
    with torch.no_grad(), forward_context(build_attention_metadata([6], [6], [[0, 1]], 4)):
        logits = model.compute_logits(model(input_ids, torch.arange(6)))
        want = hf_model.language_model(input_ids[None]).logits[0]
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
