"""fovea.models.llama_decode: decode steps through the `DecodePlan` (one loop of extension calls) give the modules'
bits: the same tokens, the same logprobs and the same K/V written to every layer's cache, for one request and for
several decoding together, with q/k/v biases (Qwen2) and with o/MLP biases (Llama); and which path a model took is
in its repr, so these tests cannot pass on the modules alone."""
import pytest
import torch

from fovea import LLM, SamplingParams
from fovea.kernels.runtime import cpu_has_bf16_linear_isa
from tests.kernels import requires_compiler
from tests.oracle.llama import build_tiny_llama
from tests.oracle.qwen2_5_vl import build_tiny_qwen2

pytestmark = [requires_compiler,
              pytest.mark.skipif(not cpu_has_bf16_linear_isa(), reason="this CPU has no AVX-512 BF16")]


@pytest.fixture(params=["none", "language_model"], ids=["panels", "in place"])
def linear_layout(request):
    """Every test on both of fovea's AVX-512 BF16 methods (`EngineConfig.in_place_weights`): packed panels
    (`BF16LinearMethod`) and the checkpoint's own pages (`BF16RowsLinearMethod`): the plan runs either, with the
    bits of the modules on the same method."""
    return request.param


PROMPTS = ["the cat sat on the mat", "a", "one two three four five six seven eight nine ten"]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("qwen2"), num_layers=3)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama"), attention_bias=True, mlp_bias=True)


def _generate(path, fused: bool, prompts: list[str], in_place_weights: str):
    llm = LLM(str(path), dtype="bfloat16", max_model_len=128, block_size=4, kv_cache_memory_bytes=1 << 22,
              in_place_weights=in_place_weights)
    runner = llm.llm_engine.runner
    lm = runner.model.model  # the LlamaModel
    lm.fused_decode = fused
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    caches = [tuple(t.clone() for t in layer.kv_cache) for layer in runner.attention_layers]
    return [(o.token_ids, o.logprobs) for o in outs], caches, repr(lm)


@pytest.mark.parametrize("model", ["qwen2", "llama"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one request", "three together"])
def test_the_plan_gives_the_modules_bits(request, model, prompts, linear_layout):
    path = request.getfixturevalue(model)
    fused, fused_caches, fused_repr = _generate(path, True, prompts, linear_layout)
    modules, module_caches, modules_repr = _generate(path, False, prompts, linear_layout)
    assert "decode=one loop of kernel calls" in fused_repr and "fused_decode off" in modules_repr
    in_place = "method=avx512-bf16-rows(" in fused_repr  # (memory): the tiny checkpoints are float32 files
    panels = "method=avx512-bf16," in fused_repr or "method=avx512-bf16(cache)" in fused_repr  # packed weights cache
    assert in_place == (linear_layout == "language_model") and panels != in_place
    assert fused == modules  # token ids and every logprob, exactly
    for (k1, v1), (k2, v2) in zip(fused_caches, module_caches, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_float32_models_keep_the_modules(qwen2, linear_layout):
    llm = LLM(str(qwen2), dtype="float32", max_model_len=64, block_size=4, kv_cache_memory_bytes=1 << 22,
              in_place_weights=linear_layout)
    llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert repr(llm.llm_engine.runner.model.model).count("decode=modules") == 1
