"""fovea's engine against transformers' Blip2ForConditionalGeneration on tiny random checkpoints.

Greedy token ids must equal transformers' batch-size-1 reference for every request, and logprobs (fovea's
top-k, from raw logits) must match log_softmax of transformers' raw `output_logits` within 1e-4 (float32).
The same must hold when requests are preempted, when prefill is chunked finer than the image placeholder
run, and with prefix caching across prompts that share text but not images.
"""
from __future__ import annotations

import pytest
import torch

from fovea import LLM, SamplingParams
from tests.e2e.blip2_cases import cases, make_image
from tests.oracle.blip2 import build_tiny_blip2, hf_reference

LOGPROBS = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # init_gain: random weights chaotic enough that outputs vary, not so chaotic that float32 rounding
    # differences (summation order) grow past 1e-4 over a few layers
    return build_tiny_blip2(tmp_path_factory.mktemp("blip2"), seed=0, init_gain=2.0)


@pytest.fixture(scope="module")
def ckpt_proj(tmp_path_factory):
    """word_embed_proj_dim != hidden size, post-layernorm OPT."""
    return build_tiny_blip2(tmp_path_factory.mktemp("blip2_proj"), seed=1, word_embed_proj_dim=16,
                            do_layer_norm_before=False, init_gain=1.5)


def _check(llm: LLM, model_dir, batch):
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=LOGPROBS, ignore_eos=True) for _, _, m in batch]
    prompts = [{"prompt": p, "multi_modal_data": {"image": img}} for p, img, _ in batch]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
    for (prompt, img, max_tokens), out in zip(batch, outs):
        ref_ids, ref_logprobs = hf_reference(model_dir, prompt, img, max_tokens)
        got = out.outputs[0]
        assert got.token_ids == ref_ids, f"prompt {prompt!r}"
        assert got.finish_reason == "length"
        assert len(got.logprobs) == len(ref_ids)
        for step, (entry, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
            assert ref_ids[step] in entry
            top = ref.topk(LOGPROBS).indices.tolist()
            assert set(top) <= set(entry), f"step {step}: top-{LOGPROBS} {top} vs {sorted(entry)}"
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref[token_id].item()) < 1e-4, (step, token_id)
    return outs


def test_batch_matches_transformers(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4)
    from fovea.layers.linear import onednn_linear_available
    if onednn_linear_available():  # the parity below is then that of the oneDNN-packed path
        assert llm.llm_engine.runner.num_prepacked_linears > 0
    outs = _check(llm, ckpt, cases(8))
    # the tiny model must not be degenerate, or the comparison proves little
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 4


def test_bfloat16_stays_as_close_to_float32_as_transformers_bfloat16(ckpt):
    # bfloat16 runs other kernels than float32 (fovea's AMX linear where the sizes allow, oneDNN elsewhere):
    # its first-step logprobs must be no further from transformers' float32 ones than transformers' own
    # bfloat16 model is (up to a factor for the different summation orders)
    batch = cases(4)
    llm = LLM(ckpt, dtype="bfloat16", block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=LOGPROBS, ignore_eos=True)
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": img}} for p, img, _ in batch], params,
                        use_tqdm=False)
    for (prompt, img, _), out in zip(batch, outs):
        _, (exact,) = hf_reference(ckpt, prompt, img, 1)
        _, (hf_bf16,) = hf_reference(ckpt, prompt, img, 1, dtype=torch.bfloat16)
        entry = out.outputs[0].logprobs[0]
        ours = max(abs(entry[t].logprob - exact[t].item()) for t in entry)
        theirs = max(abs(hf_bf16[t].item() - exact[t].item()) for t in entry)
        assert ours <= 3 * theirs + 0.02, f"{prompt!r}: fovea bf16 off by {ours:.3f}, transformers bf16 {theirs:.3f}"


def test_projection_and_post_layernorm_variant(ckpt_proj):
    llm = LLM(ckpt_proj, dtype="float32", block_size=4)
    _check(llm, ckpt_proj, cases(8))


def test_preemption_keeps_results_exact(ckpt):
    # 8 requests but KV room for about two at a time: requests are preempted and recomputed
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=48, num_kv_blocks=16, enable_prefix_caching=False)
    _check(llm, ckpt, cases(8))
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_chunked_prefill_smaller_than_placeholder_run(ckpt):
    # chunks of 3 tokens: the 8 image placeholders span several steps, the image is still encoded once
    llm = LLM(ckpt, dtype="float32", block_size=4, max_num_batched_tokens=3, max_num_seqs=3)
    _check(llm, ckpt, cases(8))


def test_prefix_caching_shares_text_but_not_images(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4)
    prompt = "Question: what colour is the large shape in the middle of the picture? Answer:"
    first = [(prompt, make_image(7, (40, 40)), 6)]
    _check(llm, ckpt, first)
    # same text, different image: the image tokens come first, so nothing may be reused
    other = [(prompt, make_image(8, (40, 40)), 6)]
    outs = _check(llm, ckpt, other)
    assert outs[0].num_cached_tokens == 0
    # same image and text again: a prefix hit, and still exact
    again = _check(llm, ckpt, first)
    assert again[0].num_cached_tokens > 0
    # after LLM.reset_prefix_cache nothing is reused: the same request computes everything again
    assert llm.reset_prefix_cache() is True
    fresh = _check(llm, ckpt, first)
    assert fresh[0].num_cached_tokens == 0


def test_text_only_request(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1, ignore_eos=True)
    out = llm.generate("the cat sat on", params, use_tqdm=False)[0]
    ref_ids, _ = hf_reference(ckpt, "the cat sat on", None, 8)
    assert out.outputs[0].token_ids == ref_ids


def _count_encoder_calls(llm: LLM) -> list[int]:
    """Record the number of images in every call of the model's encoder."""
    model = llm.llm_engine.runner.model
    original = model.embed_multimodal
    calls: list[int] = []

    def counting(**kwargs):
        out = original(**kwargs)
        calls.append(len(out))
        return out

    model.embed_multimodal = counting
    return calls


def test_image_encoded_once_under_chunked_prefill(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_num_batched_tokens=3, max_num_seqs=3)
    calls = _count_encoder_calls(llm)
    prompt, img, max_tokens = cases(1)[0]
    _check(llm, ckpt, [(prompt, img, max_tokens)])
    assert calls == [1]  # 8 placeholders over 3 chunks, one encoder pass
    # two requests with the same (new) image content share one encoder output
    calls.clear()
    other = make_image(55, (45, 45))
    _check(llm, ckpt, [(prompt, other, 4), ("a photo of", other.copy(), 4)])
    assert sum(calls) == 1
    # the same image and prompt again: the prefix cache covers the placeholders, so no encoder work at all
    calls.clear()
    _check(llm, ckpt, [(prompt, other, 4)])
    assert calls == []


def test_kv_cache_sized_from_memory_bytes(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 20)
    runner = llm.llm_engine.runner
    assert runner.num_blocks == (1 << 20) // runner.kv_bytes_per_block()
    k_cache, _ = runner.attention_layers[0].kv_cache
    assert k_cache.shape[0] == runner.num_blocks * 4
