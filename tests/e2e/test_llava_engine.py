"""fovea's engine against transformers' LlavaForConditionalGeneration (CLIP + Llama) on tiny random checkpoints.

One mixed batch goes through `LLM.generate` with prefill chunks smaller than an image's 25 placeholders and KV
room for only a few requests (so requests are preempted and recomputed): images of odd sizes, two images in one
prompt, text only, and pre-computed `image_embeds`. Greedy ids equal transformers' batch-size-1 `generate` on
its own `LlavaProcessor`'s inputs, logprobs within 1e-4 of its raw logits (float32). Then prefix caching: the
same image and text again is a hit and still exact, another image with the same text is not.
"""
from __future__ import annotations

import pytest
import torch

from fovea import LLM, SamplingParams
from tests.e2e.blip2_cases import make_image
from tests.e2e.llava_cases import Case, check_bfloat16_close, check_chat, check_placeholder_mismatch, run
from tests.oracle import llava as oracle
from tests.oracle.llava import build_tiny_llava, llava_prompt


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


def test_mixed_batch_chunked_preempted_and_cached(ckpt):
    # 16-token steps split every image's 25 placeholders; 30 blocks of 4 hold about three requests at a time
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=16,
              num_kv_blocks=30)
    batch = cases()
    outs = run(llm, ckpt, batch, oracle)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == len(batch)  # not degenerate
    assert llm.llm_engine.scheduler.num_preemptions > 0
    # prefix caching: the same image and text is a hit past the image; with another image only the text
    # blocks before it are shared
    first = Case("cache first", llava_prompt("What colour is the car?"), [make_image(7, (41, 40))], 6)
    other = Case("cache other", first.prompt, [make_image(8, (41, 40))], 6)
    run(llm, ckpt, [first], oracle)
    out = run(llm, ckpt, [other], oracle)[0]
    image_offset = out.prompt_token_ids.index(llm.llm_engine.processor.info.get_image_token_id())
    assert out.num_cached_tokens <= image_offset
    again = run(llm, ckpt, [first], oracle)[0]
    assert again.num_cached_tokens >= len(again.prompt_token_ids) - 4


def test_feature_layer_list_full_strategy_mistral(ckpt_variant):
    llm = LLM(ckpt_variant, dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=20)
    assert llm.llm_engine.processor.info.get_num_image_tokens() == 26  # 25 patches + the class token
    run(llm, ckpt_variant, [c for c in cases() if c.name in ("image", "two odd sizes", "text only", "embeds")],
        oracle)


def test_bfloat16_stays_as_close_to_float32_as_transformers_bfloat16(ckpt):
    llm = LLM(ckpt, dtype="bfloat16", block_size=4, max_model_len=128)
    check_bfloat16_close(llm, ckpt, [c for c in cases() if c.name in ("image", "two odd sizes", "text only")], oracle)


def test_chat_uses_the_checkpoint_template(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128)
    text = "What is in this image?"
    check_chat(llm, ckpt, text, "<s>" + llava_prompt(text), llava_prompt(text), oracle)


@pytest.mark.parametrize("prompt,num_images,match", [
    (llava_prompt("two placeholders", 2), 1, r"more image placeholders than the 1 image item"),
    ("USER: no placeholder ASSISTANT:", 1, r"0 image placeholder\(s\) but 1 image item"),
    (llava_prompt("a placeholder but no image"), 0, r"holds 1 image token\(s\) \(id \d+\) that no image fills"),
])
def test_placeholders_must_match_images(ckpt, prompt, num_images, match):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128)
    check_placeholder_mismatch(llm, prompt, num_images, match, llava_prompt("ok"), (20, 20))


def test_bad_image_embeds_are_named(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128)
    with pytest.raises(ValueError, match=r"image_embeds has shape \(24, 64\).*expects floats of shape \(25, 64\)"):
        llm.generate({"prompt": llava_prompt("x"), "multi_modal_data": {"image": torch.zeros(24, 64)}},
                     SamplingParams(max_tokens=2), use_tqdm=False)
