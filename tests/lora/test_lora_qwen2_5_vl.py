"""LoRA on Qwen2.5-VL's language model (M-RoPE, images): a PEFT adapter on the LM's projections, with and without
an image, next to base-model requests in one batch, equal to transformers' Qwen2.5-VL with the adapter merged by
PEFT (greedy ids, logprobs within 1e-4, float32)."""
from __future__ import annotations

from fovea import LLM, LoRARequest, SamplingParams
from tests.e2e.qwen_cases import cases, reference_inputs
from tests.lora.adapters import make_peft_adapter, merged_checkpoint
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl, hf_reference

LOGPROBS = 3


def test_adapter_and_base_with_images_in_one_batch_match_peft(tmp_path):
    base = build_tiny_qwen2_5_vl(tmp_path / "base", seed=0)
    # the LM only: the vision blocks have gate/up/down projections too
    adapter = make_peft_adapter(base, tmp_path / "lm", r=4, lora_alpha=8, seed=5, target_modules=(
        r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|o_proj)|mlp\.(up_proj|down_proj))"))
    merged = str(merged_checkpoint(base, adapter, tmp_path / "merged"))
    lora = LoRARequest("lm", 1, str(adapter))
    llm = LLM(str(base), dtype="float32", block_size=4, max_model_len=256, enable_lora=True)
    batch = [c for c in cases() if c.name in ("image", "two images", "text only")]
    runs = [(case, adapter_on) for case in batch for adapter_on in (True, False)]
    params = [SamplingParams(temperature=0.0, max_tokens=c.max_tokens, logprobs=LOGPROBS, ignore_eos=True)
              for c, _ in runs]
    outs = llm.generate([c.prompt_dict() for c, _ in runs], params,
                        lora_request=[lora if on else None for _, on in runs], use_tqdm=False)
    for (case, adapter_on), out in zip(runs, outs):
        ids, mm = reference_inputs(str(base), case)
        ref_ids, ref_logprobs = hf_reference(merged if adapter_on else str(base), ids, case.max_tokens, **mm)
        got = out.outputs[0]
        assert got.token_ids == ref_ids, (case.name, adapter_on)
        for step, (entry, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref[token_id].item()) < 1e-4, (case.name, adapter_on, step, token_id)
    assert any(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(outs[0::2], outs[1::2]))
