"""fovea's engine on encoder-decoder checkpoints against transformers: T5 text-only, BLIP-2 and InstructBLIP over
Flan-T5 (tiny, random, built by tests.oracle.t5).

Greedy ids equal transformers' batch-of-one generate and logprobs are within 1e-4 of its raw `output_logits`
(float32): 8 requests of different prompt (and image) and output lengths in one batch, the empty prompt among
them; under a KV pool so small that requests are preempted (asserted) and recompute their encoder and cross
blocks, with decoder chunks of 3 tokens; and in bfloat16, as close to transformers' float32 as transformers'
own bfloat16 is.
"""
from __future__ import annotations

import pytest
import torch

from fovea import LLM, SamplingParams
from tests.e2e.blip2_cases import cases
from tests.oracle.t5 import build_tiny_blip2_t5, build_tiny_instructblip_t5, build_tiny_t5, hf_reference

LOGPROBS = 3
TEXT_PROMPTS = [
    "A photo of a cat sitting on a window sill, looking at the birds outside. Two dogs running along the beach "
    "while the waves roll onto the sand.",  # long enough for the logarithmic position buckets
    "Question: how many",
    "",
    "Red, orange, yellow, green, blue",
    "describe",
    "The street is busy with cars, taxis, buses and people walking to work.",
    "Hello world!",
    "A bowl of fruit: bananas, oranges, grapes",
]
MAX_TOKENS = [12, 7, 25, 5, 10, 9, 14, 6]


@pytest.fixture(scope="module")
def t5_flan(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5_flan"), seed=1, hub_form="flan")


@pytest.fixture(scope="module")
def blip2_t5(tmp_path_factory):
    return build_tiny_blip2_t5(tmp_path_factory.mktemp("blip2_t5"), seed=0)


@pytest.fixture(scope="module")
def blip2_t5_hub_flan(tmp_path_factory):
    """As Salesforce/blip2-flan-t5-xl stores it: text_config.tie_word_embeddings false and its own lm_head."""
    return build_tiny_blip2_t5(tmp_path_factory.mktemp("blip2_t5_hub"), seed=4, hub_form="flan")


@pytest.fixture(scope="module")
def blip2_t5_heads64(tmp_path_factory):
    """Heads of 64 (Flan-T5's d_kv): bfloat16 decode attention runs the kernel's AVX-512 BF16 loop."""
    return build_tiny_blip2_t5(tmp_path_factory.mktemp("blip2_t5_heads64"), seed=5, hidden=128, num_heads=2)


@pytest.fixture(scope="module")
def instructblip_t5(tmp_path_factory):
    return build_tiny_instructblip_t5(tmp_path_factory.mktemp("instructblip_t5"), seed=3, init_gain=3.0)


def _requests(batch, with_image: bool):
    if with_image:
        return [{"prompt": p, "multi_modal_data": {"image": img}} for p, img, _ in batch]
    return [p for p, _, _ in batch]


def _check(llm: LLM, model_dir, batch, with_image: bool = True):
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=LOGPROBS, ignore_eos=True) for _, _, m in batch]
    outs = llm.generate(_requests(batch, with_image), params, use_tqdm=False)
    for (prompt, img, max_tokens), out in zip(batch, outs):
        ref_ids, ref_logprobs = hf_reference(model_dir, prompt, img if with_image else None, max_tokens)
        got = out.outputs[0]
        assert got.token_ids == ref_ids, f"prompt {prompt!r}"
        assert len(got.logprobs) == len(ref_ids)
        for step, (entry, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
            assert set(ref.topk(LOGPROBS).indices.tolist()) <= set(entry), f"step {step}"
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref[token_id].item()) < 1e-4, (prompt, step, token_id)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > len(batch) // 2  # not degenerate
    return outs


def _text_cases():
    return [(p, None, m) for p, m in zip(TEXT_PROMPTS, MAX_TOKENS)]


def test_t5_text_mixed_batch_matches_transformers(t5_flan):
    llm = LLM(t5_flan, dtype="float32", block_size=4)
    outs = _check(llm, t5_flan, _text_cases(), with_image=False)
    assert llm.llm_engine.max_model_len == 512  # the tokenizer's model_max_length (T5 has no position limit)
    tokenizer = llm.get_tokenizer()
    assert outs[0].prompt_token_ids == tokenizer(TEXT_PROMPTS[0]).input_ids  # the encoder's prompt is reported
    assert outs[2].prompt_token_ids == [1]  # "" is T5's lone </s>
    scheduler = llm.llm_engine.scheduler
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_manager.num_usable_blocks


def test_t5_text_preempted_and_chunked(t5_flan):
    # 19 usable blocks of 4: the long prompt alone takes 14 cross blocks, so requests preempt each other
    llm = LLM(t5_flan, dtype="float32", block_size=4, num_kv_blocks=20, max_num_batched_tokens=3, max_num_seqs=4)
    _check(llm, t5_flan, _text_cases(), with_image=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_t5_prompt_over_max_model_len_is_refused(t5_flan):
    llm = LLM(t5_flan, dtype="float32", block_size=4, max_model_len=16, num_kv_blocks=20)
    with pytest.raises(ValueError, match="max_model_len=16, the encoder's limit"):
        llm.generate([TEXT_PROMPTS[0]], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["describe"], SamplingParams(max_tokens=16), use_tqdm=False)  # 1 start token + 16 > 16
    out = llm.generate(["describe"], SamplingParams(max_tokens=15, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 15


def test_blip2_t5_mixed_batch_matches_transformers(blip2_t5):
    llm = LLM(blip2_t5, dtype="float32", block_size=4)
    _check(llm, blip2_t5, cases(8))


def test_blip2_t5_preempted_and_chunked(blip2_t5_hub_flan):
    llm = LLM(blip2_t5_hub_flan, dtype="float32", block_size=4, num_kv_blocks=16, max_num_batched_tokens=3,
              max_num_seqs=4)
    assert not llm.llm_engine.runner.model.language_model.is_lm_head_tied
    _check(llm, blip2_t5_hub_flan, cases(8))
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_instructblip_t5_mixed_batch_matches_transformers(instructblip_t5):
    llm = LLM(instructblip_t5, dtype="float32", block_size=4)
    _check(llm, instructblip_t5, cases(8))


def test_instructblip_t5_preempted_and_chunked(instructblip_t5):
    llm = LLM(instructblip_t5, dtype="float32", block_size=4, num_kv_blocks=16, max_num_batched_tokens=3,
              max_num_seqs=4)
    _check(llm, instructblip_t5, cases(8))
    assert llm.llm_engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("fixture", ["blip2_t5", "blip2_t5_heads64"])
def test_blip2_t5_bfloat16_as_close_as_transformers_own(request, fixture):
    """fovea in bfloat16 vs transformers in float32: no further off than transformers in bfloat16 is (teacher
    forced on the float32 tokens, so both see the same decoder inputs)."""
    blip2_t5 = request.getfixturevalue(fixture)
    batch = cases(4)
    llm = LLM(blip2_t5, dtype="bfloat16", block_size=4)
    fovea_errors, hf_errors = [], []
    for prompt, img, max_tokens in batch:
        ref_ids, ref_lp = hf_reference(blip2_t5, prompt, img, max_tokens)
        _, bf16_lp = hf_reference(blip2_t5, prompt, img, max_tokens, dtype=torch.bfloat16)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=LOGPROBS, ignore_eos=True)
        got = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": img}}], params, use_tqdm=False)[0]
        got_ids = got.outputs[0].token_ids
        # compare while both still follow the float32 path (bfloat16 may pick another token later)
        for step, (ref, bf16) in enumerate(zip(ref_lp, bf16_lp)):
            if got_ids[:step] != ref_ids[:step] or int(bf16.argmax()) != ref_ids[step]:
                break
            for token_id, lp in got.outputs[0].logprobs[step].items():
                fovea_errors.append(abs(lp.logprob - ref[token_id].item()))
                hf_errors.append(abs(bf16[token_id].item() - ref[token_id].item()))
    assert len(fovea_errors) >= 12
    fovea_mean, hf_mean = sum(fovea_errors) / len(fovea_errors), sum(hf_errors) / len(hf_errors)
    assert hf_mean > 1e-4  # bfloat16 really ran
    assert fovea_mean <= 1.5 * hf_mean + 1e-3, (fovea_mean, hf_mean)


@pytest.mark.parametrize("fixture, template_prompt", [
    ("blip2_t5", "Question: {} Answer:"),  # BLIP-2's VQA prompt, as vLLM's fallback for BLIP-2-OPT
    ("instructblip_t5", "{}"),  # InstructBLIP's instruction as written
])
def test_chat_through_the_fallback_template_equals_generate_and_transformers(request, fixture, template_prompt):
    """LLM.chat on a T5-based checkpoint (which ships no chat template): the fallback renders the prompt a user
    would give generate(), with T5's closing </s> and no BOS, so the encoder sees the same ids and the reply is
    transformers' own."""
    model_dir = request.getfixturevalue(fixture)
    llm = LLM(model_dir, dtype="float32", block_size=4)
    assert not llm.get_tokenizer().chat_template
    question, (_, img, _) = "what is in the picture?", cases(1)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=LOGPROBS, ignore_eos=True)
    chat = llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": img},
                                                   {"type": "text", "text": question}]}], params, use_tqdm=False)[0]
    prompt = template_prompt.format(question)
    assert chat.prompt == prompt + "</s>"
    generated = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": img}}], params, use_tqdm=False)[0]
    assert chat.prompt_token_ids == generated.prompt_token_ids
    assert chat.outputs[0].token_ids == generated.outputs[0].token_ids
    ref_ids, _ = hf_reference(model_dir, prompt, img, 8)
    assert chat.outputs[0].token_ids == ref_ids
