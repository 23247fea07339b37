"""fovea's engine against transformers' InstructBlipForConditionalGeneration (OPT or Llama LM) on tiny checkpoints.

As for BLIP-2 (test_blip2_engine.py): greedy ids equal transformers' batch-of-one reference and logprobs are within
1e-4 of its raw `output_logits` (float32), in one mixed batch, under preemption, with prefill chunks smaller than
the image's placeholder run, and with prefix caching. What InstructBLIP adds: the image's rows depend on the prompt
(the Q-Former reads it), so the same image under another prompt must share nothing, and chat renders fovea's
InstructBLIP fallback template.
"""
from __future__ import annotations

import pytest
import torch

from fovea import LLM, SamplingParams
from tests.e2e.blip2_cases import cases, make_image
from tests.oracle.instructblip import _load, build_tiny_instructblip, hf_reference

LOGPROBS = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_instructblip(tmp_path_factory.mktemp("instructblip"), seed=0)


@pytest.fixture(scope="module")
def ckpt_llama(tmp_path_factory):
    """A Llama LM (Vicuna's architecture: GQA, untied head) and a Llama-style tokenizer."""
    return build_tiny_instructblip(tmp_path_factory.mktemp("instructblip_llama"), seed=1, language_model="llama")


def _check(llm: LLM, model_dir, batch):
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=LOGPROBS, ignore_eos=True) for _, _, m in batch]
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": img}} for p, img, _ in batch], params,
                        use_tqdm=False)
    for (prompt, img, max_tokens), out in zip(batch, outs):
        ref_ids, ref_logprobs = hf_reference(model_dir, prompt, img, max_tokens)
        got = out.outputs[0]
        assert got.token_ids == ref_ids, f"prompt {prompt!r}"
        assert len(got.logprobs) == len(ref_ids)
        for step, (entry, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
            assert set(ref.topk(LOGPROBS).indices.tolist()) <= set(entry), f"step {step}"
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref[token_id].item()) < 1e-4, (prompt, step, token_id)
    return outs


def test_mixed_batch_matches_transformers(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4)
    outs = _check(llm, ckpt, cases(8))
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 4  # not degenerate


def test_llama_lm_mixed_batch_chunked_preempted_and_prefix_cached(ckpt_llama):
    llm = LLM(ckpt_llama, dtype="float32", block_size=4, max_model_len=48, num_kv_blocks=14,
              max_num_batched_tokens=5, max_num_seqs=4)
    outs = _check(llm, ckpt_llama, cases(8))
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 4
    _check(llm, ckpt_llama, cases(1))
    again = _check(llm, ckpt_llama, cases(1))  # right after: its blocks are still cached (14 blocks in all)
    assert again[0].num_cached_tokens > 0


def test_preemption_and_chunks_smaller_than_the_placeholder_run(ckpt):
    preempting = LLM(ckpt, dtype="float32", block_size=4, max_model_len=48, num_kv_blocks=16,
                     enable_prefix_caching=False)
    _check(preempting, ckpt, cases(8))
    assert preempting.llm_engine.scheduler.num_preemptions > 0
    chunked = LLM(ckpt, dtype="float32", block_size=4, max_num_batched_tokens=3, max_num_seqs=3)
    _check(chunked, ckpt, cases(8))


def test_the_same_image_under_another_prompt_shares_nothing(ckpt):
    """The image tokens come first, so without the instruction in the image's hash the second prompt would reuse
    the first one's image rows (encoder cache) and KV blocks (prefix cache), and be wrong."""
    llm = LLM(ckpt, dtype="float32", block_size=4)
    image = make_image(7, (40, 40))
    first = _check(llm, ckpt, [("Question: how many cats are there? Answer:", image, 6)])
    other = _check(llm, ckpt, [("describe the picture", image, 6)])
    assert other[0].num_cached_tokens == 0
    again = _check(llm, ckpt, [("Question: how many cats are there? Answer:", image, 6)])
    assert again[0].num_cached_tokens > 0
    assert first[0].outputs[0].token_ids == again[0].outputs[0].token_ids


def test_the_qformer_reads_the_prompt_as_transformers_processor_tokenizes_it(ckpt):
    """Text prompts and token-id prompts (what chat sends) give the Q-Former the ids InstructBlipProcessor makes."""
    llm = LLM(ckpt, dtype="float32", block_size=4)
    _, processor = _load(str(ckpt))
    processor_of = llm.llm_engine.processor
    image = make_image(3, (30, 30))
    for prompt in ("What is unusual about this image?", ""):
        expected = processor(images=image, text=prompt)["qformer_input_ids"][0]
        ids = llm.get_tokenizer()(prompt).input_ids
        for given in (prompt, ids):
            feature = processor_of.apply(given, {"image": [image]}, {"image": ["h"]}).mm_features[0]
            assert feature.data["qformer_input_ids"].tolist() == expected
            assert feature.data["qformer_num_tokens"].tolist() == [len(expected)]
            assert feature.mm_hash.startswith("h:instruction-")


def test_precomputed_image_embeds_take_the_place_of_pixels(ckpt):
    """image_embeds (language_projection outputs, computed for the prompt) give what the pixels give."""
    llm = LLM(ckpt, dtype="float32", block_size=4)
    prompt, image, max_tokens = cases(1)[0]
    model, processor = _load(str(ckpt))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=inputs["pixel_values"],
                                          qformer_input_ids=inputs["qformer_input_ids"],
                                          qformer_attention_mask=inputs["qformer_attention_mask"]).pooler_output[0]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, ignore_eos=True)
    from_embeds = llm.generate({"prompt": prompt, "multi_modal_data": {"image": embeds}}, params, use_tqdm=False)[0]
    assert from_embeds.outputs[0].token_ids == hf_reference(ckpt, prompt, image, max_tokens)[0]


def test_chat_renders_the_instructblip_fallback(ckpt):
    """The checkpoint ships no chat template: chat is the instruction as written, after BOS."""
    llm = LLM(ckpt, dtype="float32", block_size=4)
    image = make_image(5, (50, 40))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    chatted = llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                                     {"type": "text", "text": "Describe the picture."}]}],
                       params, use_tqdm=False)[0]
    assert chatted.prompt == "</s>Describe the picture."
    assert chatted.outputs[0].token_ids == hf_reference(ckpt, "Describe the picture.", image, 6)[0]


def test_bfloat16_stays_as_close_to_float32_as_transformers_bfloat16(ckpt):
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


def test_a_prompt_longer_than_the_qformer_reads_is_a_clear_error(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4)
    long_prompt = " ".join(["the cat sat on the red sofa"] * 12)  # > 64 Q-Former tokens (its positions)
    image = make_image(9, (30, 30))
    with pytest.raises(ValueError, match=r"prompt 1: the prompt is \d+ tokens for InstructBLIP's Q-Former, which "
                                         r"reads at most 64 \(its max_position_embeddings\); shorten the prompt"):
        llm.generate([{"prompt": "a photo of", "multi_modal_data": {"image": image}},
                      {"prompt": long_prompt, "multi_modal_data": {"image": image}}], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    # text alone is not read by the Q-Former: no limit but the LM's
    assert llm.generate(long_prompt, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
