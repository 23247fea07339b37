"""The text-only Qwen2 decoder against transformers' `Qwen2ForCausalLM`, and checkpoint layouts."""
from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fovea.models.qwen2 import Qwen2ForCausalLM
from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from fovea.models.weights import load_weights
from tests.oracle.qwen2_5_vl import build_tiny_qwen2, build_tiny_qwen2_5_vl, hf_reference
from tests.models.test_qwen2_5_vl_model import PagedSteps

PROMPT = "<|im_start|>user\nWhat is the man holding? Answer: the man is<|im_end|>\n<|im_start|>assistant\n"


def fovea_model(cls, model_dir):
    model = cls(transformers.AutoConfig.from_pretrained(model_dir)).eval().requires_grad_(False)
    load_weights(model, model_dir)
    return model


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [None, 5], ids=["whole prefill", "chunks of 5"])
def test_matches_transformers(tmp_path, tied, chunk):
    model_dir = build_tiny_qwen2(tmp_path, seed=3, tie_word_embeddings=tied)
    model = fovea_model(Qwen2ForCausalLM, model_dir)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.tensor(transformers.AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids)
    ref_ids, ref_logprobs = hf_reference(model_dir, ids, 6)
    assert len(set(ref_ids)) > 2
    steps, got = PagedSteps(model), []
    with torch.no_grad():
        embeds = model.embed_input_ids(ids)
        for start in range(0, len(ids), chunk or len(ids)):
            end = min(len(ids), start + (chunk or len(ids)))
            logprobs = steps.step([("a", embeds[start:end], torch.arange(start, end))])[0]
        got.append(logprobs)
        for _ in range(5):
            position = len(ids) + len(got) - 1
            token = model.embed_input_ids(torch.tensor([int(got[-1].argmax())]))
            got.append(steps.step([("a", token, torch.tensor([position]))])[0])
    assert [int(g.argmax()) for g in got] == ref_ids
    for step, (g, w) in enumerate(zip(got, ref_logprobs)):
        assert (g - w).abs().max().item() < 1e-4, step


def test_both_checkpoint_layouts_load(tmp_path):
    """transformers 5.23 saves Qwen2.5-VL in the released (transformers 4) layout: `visual.`, `model.layers.`;
    a checkpoint named as the transformers 5 modules are (`model.visual.`, `model.language_model.`) loads too."""
    model_dir = build_tiny_qwen2_5_vl(tmp_path / "a")
    names = set(load_file(str(model_dir / "model.safetensors")))
    assert any(n.startswith("visual.") for n in names) and any(n.startswith("model.layers.") for n in names)
    reference = fovea_model(Qwen2_5_VLForConditionalGeneration, model_dir)

    def v5_name(name):
        if name.startswith("visual."):
            return "model." + name
        return "model.language_model." + name[len("model."):] if name.startswith("model.") else name

    tensors = {v5_name(n): t for n, t in load_file(str(model_dir / "model.safetensors")).items()}
    save_file(tensors, str(model_dir / "model.safetensors"))
    renamed = fovea_model(Qwen2_5_VLForConditionalGeneration, model_dir)
    for (name, a), (_, b) in zip(reference.state_dict().items(), renamed.state_dict().items()):
        assert torch.equal(a, b), name
    del tensors["model.visual.merger.ln_q.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="merger.ln_q.weight"):
        fovea_model(Qwen2_5_VLForConditionalGeneration, model_dir)


def test_sliding_window_and_scaled_rope_are_refused(tmp_path):
    config = transformers.AutoConfig.from_pretrained(build_tiny_qwen2(tmp_path))
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        Qwen2ForCausalLM(config)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    config.use_sliding_window = True
    with pytest.raises(ValueError, match="sliding-window"):
        Qwen2ForCausalLM(config)
