"""Text-only Llama and Mistral through `LLM.generate` against transformers' own classes, one batch per checkpoint.

Each checkpoint varies what a Llama config can: GQA, tied or untied `lm_head`, `attention_bias` / `mlp_bias`, and
RoPE "default", "linear", "dynamic" (prompts longer than max_position_embeddings, so the NTK base moves every
step) and "llama3". Greedy ids equal transformers' batch-size-1 `generate`, logprobs within 1e-4 of its raw
logits (float32).
"""
from __future__ import annotations

import pytest
import torch
import transformers

from fovea import LLM, SamplingParams
from tests.oracle.llama import build_tiny_llama, hf_reference

LOGPROBS = 3
ATOL = 1e-4
PROMPTS = [
    "Question: how many cats are there? Answer:",
    "A photo of a cat sitting on a window sill, looking at the birds outside. The birds are",
    "Red, orange, yellow, green, blue, purple, pink, brown, black, white, grey. The quick brown fox jumps over "
    "the lazy dog near the river bank, and then",
    "Hello",
    "Describe the image in detail. Write a short caption for this photo. Two dogs running along the beach",
]
MAX_TOKENS = [9, 6, 12, 10, 7]

VARIANTS = {
    "default, tied, biases": dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    # prompts of 20-40 tokens against max_position_embeddings 24: the base changes with every length
    "dynamic": dict(max_position_embeddings=24,
                    rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0}),
    "llama3": dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": dict(mistral=True, sliding_window=512, head_dim=24),
}


def check_batch(llm: LLM, model_dir, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=LOGPROBS, ignore_eos=True) for m in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    for prompt, out in zip(prompts, outs):
        ids = tokenizer(prompt).input_ids
        assert out.prompt_token_ids == ids
        ref_ids, ref_logprobs = hf_reference(model_dir, torch.tensor(ids), len(out.outputs[0].token_ids))
        got = out.outputs[0]
        assert got.token_ids == ref_ids, prompt
        for step, (entry, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
            assert set(ref.topk(LOGPROBS).indices.tolist()) <= set(entry), (prompt, step)
            for token_id, lp in entry.items():
                err = abs(lp.logprob - ref[token_id].item())
                assert err < ATOL, f"{prompt!r} step {step} token {token_id}: off by {err:.2e}"
    return outs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_matches_transformers(tmp_path, variant):
    model_dir = build_tiny_llama(tmp_path, seed=len(variant), **VARIANTS[variant])
    # dynamic RoPE past max_position_embeddings: a token keeps the rotation of the step that computed it, so
    # shared prefix blocks (computed at another length) would differ from transformers' one-pass prefill
    llm = LLM(str(model_dir), dtype="float32", block_size=4, max_model_len=64,
              enable_prefix_caching=variant != "dynamic")
    outs = check_batch(llm, str(model_dir))
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == len(outs)  # not degenerate
    if variant == "dynamic":
        assert max(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs) > 24


def test_chunked_prefill_and_preemption(tmp_path):
    model_dir = str(build_tiny_llama(tmp_path, seed=5, tie_word_embeddings=True))
    check_batch(LLM(model_dir, dtype="float32", block_size=4, max_model_len=64, max_num_batched_tokens=5), model_dir)
    llm = LLM(model_dir, dtype="float32", block_size=4, max_model_len=64, num_kv_blocks=20,
              enable_prefix_caching=False)
    check_batch(llm, model_dir)
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_mistral_window_bounds_max_model_len(tmp_path):
    model_dir = str(build_tiny_llama(tmp_path, mistral=True, sliding_window=16, max_position_embeddings=128))
    with pytest.raises(ValueError, match=r"max_model_len=32 exceeds the checkpoint's sliding_window=16"):
        LLM(model_dir, dtype="float32", max_model_len=32)
    # not given: capped to the window, where full attention equals windowed attention
    assert LLM(model_dir, dtype="float32").llm_engine.max_model_len == 16


def test_unsupported_rope_is_refused(tmp_path):
    model_dir = build_tiny_llama(tmp_path)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    from fovea.models.llama import LlamaForCausalLM

    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported .*'linear', 'dynamic', 'llama3'"):
        LlamaForCausalLM(config)
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match=r"needs \['low_freq_factor', 'high_freq_factor'"):
        LlamaForCausalLM(config)
