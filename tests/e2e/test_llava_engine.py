"""fovea's engine against transformers' LlavaForConditionalGeneration (CLIP + Llama) on tiny random checkpoints.

One mixed batch goes through `LLM.generate` with prefill chunks smaller than an image's 25 placeholders and KV
room for only a few requests (so requests are preempted and recomputed): images of odd sizes, two images in one
prompt, text only, and pre-computed `image_embeds`. Greedy ids equal transformers' batch-size-1 `generate` on
its own `LlavaProcessor`'s inputs, logprobs within 1e-4 of its raw logits (float32). Then prefix caching: the
same image and text again is a hit and still exact, another image with the same text is not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from fovea import LLM, SamplingParams
from tests.e2e.blip2_cases import make_image
from tests.oracle import llava as llava_oracle
from tests.oracle.llava import build_tiny_llava, hf_reference, llava_prompt

LOGPROBS = 3
ATOL = 1e-4


@dataclass
class Case:
    name: str
    prompt: str
    images: list = field(default_factory=list)
    max_tokens: int = 8
    as_embeds: bool = False  # give the images as transformers' projector outputs instead of pixels


def cases() -> list[Case]:
    return [
        Case("image", llava_prompt("What is in this image?"), [make_image(1, (64, 48))], 10),
        Case("two odd sizes", llava_prompt("Which one is bigger?", 2), [make_image(2, (17, 95)),
                                                                        make_image(3, (200, 121))], 7),
        Case("text only", "USER: Hello world! Write a short caption for this photo. ASSISTANT:", [], 9),
        Case("tiny", llava_prompt("Describe the image in detail."), [make_image(4, (8, 5))], 12),
        Case("embeds", llava_prompt("Where is the dog?"), [make_image(5, (75, 61))], 6, as_embeds=True),
        Case("image last", "USER: Describe it in one long sentence, please.\n<image> ASSISTANT:",
             [make_image(6, (33, 34))], 8),
    ]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_llava(tmp_path_factory.mktemp("llava"), seed=0))


@pytest.fixture(scope="module")
def ckpt_variant(tmp_path_factory):
    """A list of feature layers (one negative), the `full` strategy (class token kept), no projector bias,
    exact GELU in the tower, and a Mistral LM with tied embeddings."""
    return str(build_tiny_llava(
        tmp_path_factory.mktemp("llava_variant"), seed=1, vision_feature_layer=[1, -1],
        vision_feature_select_strategy="full", multimodal_projector_bias=False, vision_act="gelu",
        text_kwargs=dict(mistral=True, sliding_window=4096, tie_word_embeddings=True)))


def prompt_dict(model_dir: str, case: Case, oracle=llava_oracle) -> dict:
    if not case.images:
        return {"prompt": case.prompt}
    images = [oracle.hf_image_embeds(model_dir, im) for im in case.images] if case.as_embeds else case.images
    return {"prompt": case.prompt, "multi_modal_data": {"image": images}}


def run(llm: LLM, model_dir: str, batch: list[Case], oracle=llava_oracle) -> list:
    """`batch` through `llm.generate` at once, each output checked against `oracle`'s (a tests.oracle module's)
    transformers reference: prompt ids, greedy ids, logprobs within ATOL."""
    params = [SamplingParams(temperature=0.0, max_tokens=c.max_tokens, logprobs=LOGPROBS, ignore_eos=True)
              for c in batch]
    outs = llm.generate([prompt_dict(model_dir, c, oracle) for c in batch], params, use_tqdm=False)
    for case, out in zip(batch, outs):
        ref_prompt, ref_ids, ref_logprobs = oracle.hf_reference(model_dir, case.prompt, case.images, case.max_tokens)
        assert out.prompt_token_ids == ref_prompt, f"{case.name}: prompt ids"
        got = out.outputs[0]
        assert got.token_ids == ref_ids, case.name
        assert got.finish_reason == "length" and len(got.logprobs) == len(ref_ids)
        for step, (entry, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
            assert set(ref.topk(LOGPROBS).indices.tolist()) <= set(entry), f"{case.name}, step {step}"
            for token_id, lp in entry.items():
                err = abs(lp.logprob - ref[token_id].item())
                assert err < ATOL, f"{case.name}, step {step}, token {token_id}: logprob off by {err:.2e}"
    return outs


def test_mixed_batch_chunked_preempted_and_cached(ckpt):
    # 16-token steps split every image's 25 placeholders; 30 blocks of 4 hold about three requests at a time
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=16,
              num_kv_blocks=30)
    batch = cases()
    outs = run(llm, ckpt, batch)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == len(batch)  # not degenerate
    assert llm.llm_engine.scheduler.num_preemptions > 0
    # prefix caching: the same image and text is a hit past the image; with another image only the text
    # blocks before it are shared
    first = Case("cache first", llava_prompt("What colour is the car?"), [make_image(7, (41, 40))], 6)
    other = Case("cache other", first.prompt, [make_image(8, (41, 40))], 6)
    run(llm, ckpt, [first])
    out = run(llm, ckpt, [other])[0]
    image_offset = out.prompt_token_ids.index(llm.llm_engine.processor.info.get_image_token_id())
    assert out.num_cached_tokens <= image_offset
    again = run(llm, ckpt, [first])[0]
    assert again.num_cached_tokens >= len(again.prompt_token_ids) - 4


def test_feature_layer_list_full_strategy_mistral(ckpt_variant):
    llm = LLM(ckpt_variant, dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=20)
    assert llm.llm_engine.processor.info.get_num_image_tokens() == 26  # 25 patches + the class token
    run(llm, ckpt_variant, [c for c in cases() if c.name in ("image", "two odd sizes", "text only", "embeds")])


def test_bfloat16_stays_as_close_to_float32_as_transformers_bfloat16(ckpt):
    # bfloat16 runs other kernels than float32: its first-step logprobs must be no further from transformers'
    # float32 ones than transformers' own bfloat16 model is (up to a factor for the summation orders)
    batch = [c for c in cases() if c.name in ("image", "two odd sizes", "text only")]
    llm = LLM(ckpt, dtype="bfloat16", block_size=4, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=LOGPROBS, ignore_eos=True)
    outs = llm.generate([prompt_dict(ckpt, c) for c in batch], params, use_tqdm=False)
    for case, out in zip(batch, outs):
        _, _, (exact,) = hf_reference(ckpt, case.prompt, case.images, 1)
        _, _, (hf_bf16,) = hf_reference(ckpt, case.prompt, case.images, 1, dtype=torch.bfloat16)
        entry = out.outputs[0].logprobs[0]
        ours = max(abs(entry[t].logprob - exact[t].item()) for t in entry)
        theirs = max(abs(hf_bf16[t].item() - exact[t].item()) for t in entry)
        assert ours <= 3 * theirs + 0.02, f"{case.name}: fovea bf16 off by {ours:.3f}, transformers bf16 {theirs:.3f}"


def test_chat_uses_the_checkpoint_template(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128)
    img = make_image(9, (90, 70))
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": img},
                                             {"type": "text", "text": "What is in this image?"}]}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt == "<s>" + llava_prompt("What is in this image?")
    ref_prompt, ref_ids, _ = hf_reference(ckpt, llava_prompt("What is in this image?"), [img], 8)
    assert out.prompt_token_ids == ref_prompt
    assert out.outputs[0].token_ids == ref_ids


@pytest.mark.parametrize("prompt,num_images,match", [
    (llava_prompt("two placeholders", 2), 1, r"more image placeholders than the 1 image item"),
    ("USER: no placeholder ASSISTANT:", 1, r"0 image placeholder\(s\) but 1 image item"),
    (llava_prompt("a placeholder but no image"), 0, r"holds 1 image token\(s\) \(id \d+\) that no image fills"),
])
def test_placeholders_must_match_images(ckpt, prompt, num_images, match):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128)
    images = [make_image(i, (20, 20)) for i in range(num_images)]
    request = {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt
    with pytest.raises(ValueError, match=match):
        llm.generate(request, SamplingParams(max_tokens=2), use_tqdm=False)
    # the engine is unharmed: a good request still runs
    good = llm.generate({"prompt": llava_prompt("ok"), "multi_modal_data": {"image": make_image(0, (20, 20))}},
                        SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(good[0].outputs[0].token_ids) == 2


def test_bad_image_embeds_are_named(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128)
    with pytest.raises(ValueError, match=r"image_embeds has shape \(24, 64\).*expects floats of shape \(25, 64\)"):
        llm.generate({"prompt": llava_prompt("x"), "multi_modal_data": {"image": torch.zeros(24, 64)}},
                     SamplingParams(max_tokens=2), use_tqdm=False)
