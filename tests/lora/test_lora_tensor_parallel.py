"""LoRA under tensor and pipeline parallelism, in real worker processes (2 ranks, gloo): PEFT adapters and the base
model mixed in one batch give the in-process engine's greedy ids and logprobs within 1e-4 (float32), which
tests/lora/ checks against PEFT's merged models. Qwen2 with one KV head (replicated on both TP ranks, so k / v
adapters keep the whole B on each) and adapters on all seven projections, split by TP = 2 or by two pipeline stages
(one adapter only on the second stage's layer); BLIP-2's OPT with images under TP = 2 (q/k/v split by heads, fc1 a
plain column-parallel layer, out_proj / fc2 row-parallel with their bias on rank 0)."""
from __future__ import annotations

import pytest

from fovea import LLM, LoRARequest, SamplingParams
from tests.e2e.blip2_cases import cases as blip2_cases
from tests.executor.test_multiproc import assert_same
from tests.lora.adapters import make_peft_adapter
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.qwen2_5_vl import build_qwen_tokenizer, build_tiny_qwen2

LOGPROBS = 3
OPTIONS = dict(dtype="float32", block_size=4, num_threads=1, enable_lora=True, max_loras=2, max_lora_rank=8)
OPT_LM = r"language_model\.model\.decoder\.layers\.\d+\."
TEXTS = ["the cat sat on the mat", "a photo of a dog", "one two three four five six seven eight nine ten", "hello"]


def run_both(base, prompts, params, adapters, tp=2, pp=1):
    """(one process, tp x pp ranks) outputs of the same batch."""
    reference = LLM(str(base), **OPTIONS).generate(prompts, params, lora_request=adapters, use_tqdm=False)
    llm = LLM(str(base), **OPTIONS, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        assert len(llm.llm_engine.engine_core.executor.workers) == tp * pp
        return reference, llm.generate(prompts, params, lora_request=adapters, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_qwen2_adapters_on_every_projection_with_replicated_kv_heads(tmp_path, tp, pp):
    base = build_tiny_qwen2(tmp_path / "base", seed=4, num_kv_heads=1)  # 2 layers: one per stage with pp = 2
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    one = make_peft_adapter(base, tmp_path / "one", target_modules=every, r=4, lora_alpha=8, seed=1)
    # only layer 1: with two stages, the first holds none of it
    two = make_peft_adapter(base, tmp_path / "two", target_modules=["k_proj", "v_proj", "down_proj"], r=8,
                            lora_alpha=16, use_rslora=True, seed=2, layers_to_transform=[1])
    loras = [None, LoRARequest("one", 1, str(one)), LoRARequest("two", 2, str(two))]
    tokenizer = build_qwen_tokenizer()
    prompts, params, adapters = [], [], []
    for i, text in enumerate(TEXTS):
        for j, lora in enumerate(loras):
            prompts.append({"prompt_token_ids": tokenizer(text).input_ids})
            params.append(SamplingParams(temperature=0.0, max_tokens=6 + (i + j) % 4, logprobs=LOGPROBS,
                                         ignore_eos=True))
            adapters.append(lora)
    reference, outputs = run_both(base, prompts, params, adapters, tp, pp)
    assert_same(reference, outputs)
    # each adapter changes the continuation of the same prompt (a test that a dropped delta would fail)
    assert len({tuple(reference[k].outputs[0].token_ids) for k in range(3)}) == 3


def test_blip2_opt_adapters_with_images(tmp_path):
    base = build_tiny_blip2(tmp_path / "base", seed=0, init_gain=2.0)
    one = make_peft_adapter(base, tmp_path / "one", target_modules=OPT_LM + r"(self_attn\.(q_proj|v_proj)|fc1)",
                            r=4, lora_alpha=8, seed=11)
    two = make_peft_adapter(base, tmp_path / "two", target_modules=OPT_LM + r"(self_attn\.(k_proj|out_proj)|fc2)",
                            r=6, lora_alpha=12, use_rslora=True, seed=12)
    loras = [None, LoRARequest("one", 1, str(one)), LoRARequest("two", 2, str(two))]
    batch = blip2_cases(6)
    prompts = [{"prompt": p, "multi_modal_data": {"image": img}} for p, img, _ in batch]
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=LOGPROBS, ignore_eos=True) for _, _, m in batch]
    adapters = loras * 2
    reference, outputs = run_both(base, prompts + prompts[:3], params + params[:3], adapters + [loras[0]] * 3)
    assert_same(reference, outputs)
    # rows 6-8 are rows 0-2's prompts and images under the base model: each adapter changed its row's output
    ids = [tuple(o.outputs[0].token_ids) for o in reference]
    assert ids[0] == ids[6] and ids[1] != ids[7] and ids[2] != ids[8]
