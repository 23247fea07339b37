"""LoRA on LLaVA-1.5's and LLaVA-NeXT's Llama language model: a PEFT adapter on the LM's projections, with and without an image,
next to base-model requests in one batch, equal to transformers' LLaVA with the adapter merged by PEFT (greedy
ids, logprobs within 1e-4, float32). A PEFT list target that also matches the CLIP tower's q_proj is refused."""
from __future__ import annotations

import pytest

from fovea import LLM, LoRARequest, SamplingParams
from tests.e2e.blip2_cases import make_image
from tests.lora.adapters import make_peft_adapter, merged_checkpoint
from tests.oracle import llava, llava_next
from tests.oracle.llava import llava_prompt

LOGPROBS = 3
LM = r"model\.language_model\.layers\.\d+\."


FAMILIES = {"llava": (llava.build_tiny_llava, llava.hf_reference),
            "llava_next": (llava_next.build_tiny_llava_next, llava_next.hf_reference)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_and_base_with_images_in_one_batch_match_peft(tmp_path, family):
    build, hf_reference = FAMILIES[family]
    base = build(tmp_path / "base", seed=0)
    adapter = make_peft_adapter(base, tmp_path / "lm", r=4, lora_alpha=8, seed=7,
                                target_modules=LM + r"(self_attn\.(q_proj|v_proj|o_proj)|mlp\.(gate_proj|down_proj))")
    merged = str(merged_checkpoint(base, adapter, tmp_path / "merged"))
    lora = LoRARequest("lm", 1, str(adapter))
    llm = LLM(str(base), dtype="float32", block_size=4, max_model_len=256, enable_lora=True)
    batch = [(llava_prompt("What is in this image?"), [make_image(1, (64, 48))], 9),
             ("USER: Hello world! Write a short caption for this photo. ASSISTANT:", [], 8)]
    runs = [(case, on) for case in batch for on in (True, False)]
    prompts = [{"prompt": p, "multi_modal_data": {"image": ims}} if ims else {"prompt": p} for (p, ims, _), _ in runs]
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=LOGPROBS, ignore_eos=True) for (_, _, m), _ in runs]
    outs = llm.generate(prompts, params, lora_request=[lora if on else None for _, on in runs], use_tqdm=False)
    for ((prompt, images, max_tokens), on), out in zip(runs, outs):
        _, ref_ids, ref_logprobs = hf_reference(merged if on else str(base), prompt, images, max_tokens)
        got = out.outputs[0]
        assert got.token_ids == ref_ids, (prompt, on)
        for step, (entry, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref[token_id].item()) < 1e-4, (prompt, on, step, token_id)
    assert all(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(outs[0::2], outs[1::2]))

    tower = make_peft_adapter(base, tmp_path / "tower", target_modules=["q_proj"])  # CLIP's q_proj too
    with pytest.raises(ValueError, match=r"module 'model\.vision_tower\.\S+q_proj' is not one fovea applies LoRA"):
        llm.generate("hello", lora_request=LoRARequest("tower", 2, str(tower)), use_tqdm=False)
