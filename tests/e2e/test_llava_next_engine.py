"""fovea's engine against transformers' LlavaNextForConditionalGeneration (CLIP + anyres + Llama) on tiny random
checkpoints (tests/oracle/llava_next.py: 24-pixel tiles of 16 features, 1x2 / 2x1 / 2x2 / 3x1 / 1x3 grids).

One mixed batch goes through `LLM.generate` with 16-token prefill chunks (every image's 36-88 placeholders are
split) and KV room for about two requests (so requests are preempted and recomputed): images of odd sizes and
aspect ratios on four different tile grids, two images in one prompt, text only, and pre-computed `image_embeds`.
Greedy ids equal transformers' batch-size-1 `generate` on its own `LlavaNextProcessor`'s inputs, logprobs within
1e-4 of its raw logits (float32). Then prefix caching on the same image, bfloat16, chat, the errors.
"""
from __future__ import annotations

import pytest
import torch

from fovea import LLM, SamplingParams
from tests.e2e.blip2_cases import make_image
from tests.e2e.llava_cases import Case, check_bfloat16_close, check_chat, check_placeholder_mismatch, run
from tests.oracle import llava_next as oracle
from tests.oracle.llava import llava_prompt
from tests.oracle.llava_next import build_tiny_llava_next


def cases() -> list[Case]:
    return [
        Case("2x2 grid, unpadded rows", llava_prompt("What is in this image?"), [make_image(1, (64, 48))], 10),
        Case("3x1 and 2x2", llava_prompt("Which one is bigger?", 2), [make_image(2, (17, 95)),
                                                                      make_image(3, (200, 121))], 7),
        Case("text only", "USER: Hello world! Write a short caption for this photo. ASSISTANT:", [], 9),
        Case("tiny, 1x2", llava_prompt("Describe the image in detail."), [make_image(4, (8, 5))], 12),
        Case("embeds", llava_prompt("Where is the dog?"), [make_image(5, (75, 61))], 6, as_embeds=True),
        Case("1x3, image last", "USER: Describe it in one long sentence, please.\n<image> ASSISTANT:",
             [make_image(6, (95, 17))], 8),
    ]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_llava_next(tmp_path_factory.mktemp("llava_next"), seed=0))


def test_mixed_batch_chunked_preempted_and_cached(ckpt):
    # 16-token steps split every image; 64 blocks of 4 hold about two requests at a time
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256, max_num_batched_tokens=16,
              num_kv_blocks=64)
    info = llm.llm_engine.processor.info
    batch = cases()
    grids = {info.tile_grid((im.height, im.width)) for c in batch for im in c.images}
    assert grids == {(2, 2), (3, 1), (1, 2), (1, 3)}
    outs = run(llm, ckpt, batch, oracle)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == len(batch)  # not degenerate
    assert llm.llm_engine.scheduler.num_preemptions > 0
    # prefix caching: the same image and text is a hit past the image; with another image of the same size only
    # the text blocks before it are shared
    first = Case("cache first", llava_prompt("What colour is the car?"), [make_image(7, (41, 40))], 6)
    other = Case("cache other", first.prompt, [make_image(8, (41, 40))], 6)
    run(llm, ckpt, [first], oracle)
    out = run(llm, ckpt, [other], oracle)[0]
    assert out.num_cached_tokens <= out.prompt_token_ids.index(info.get_image_token_id())
    again = run(llm, ckpt, [first], oracle)[0]
    assert again.num_cached_tokens >= len(again.prompt_token_ids) - 4


@pytest.mark.parametrize("variant", ["qwen2", "mistral, layer list"])
def test_other_language_models_and_feature_layers(tmp_path, variant):
    """A Qwen2 LM with tied embeddings; a Mistral LM whose text config says tied but LLaVA-NeXT's does not (so
    transformers does not tie them), a list of feature layers (one negative), exact GELU in the
    tower, no projector bias, and pinpoints with a one-tile grid and a 1x4 one."""
    if variant == "qwen2":  # and lm_head tied by the top-level config (transformers' rule)
        model_dir = str(build_tiny_llava_next(tmp_path, seed=3, qwen2=True, tie_word_embeddings=True))
    else:
        model_dir = str(build_tiny_llava_next(
            tmp_path, seed=1, vision_feature_layer=[1, -1], vision_act="gelu", multimodal_projector_bias=False,
            image_grid_pinpoints=[[24, 24], [24, 96], [48, 48]],
            text_kwargs=dict(mistral=True, sliding_window=4096, tie_word_embeddings=True)))
    llm = LLM(model_dir, dtype="float32", block_size=4, max_model_len=256, max_num_batched_tokens=24)
    batch = [c for c in cases() if c.name in ("2x2 grid, unpadded rows", "3x1 and 2x2", "text only", "embeds",
                                              "tiny, 1x2", "1x3, image last")]
    if variant != "qwen2":  # the tiny image takes the one-tile grid, the wide one the 1x4
        info = llm.llm_engine.processor.info
        assert {info.tile_grid((im.height, im.width)) for c in batch for im in c.images} >= {(1, 1), (1, 4)}
    run(llm, model_dir, batch, oracle)


def test_bfloat16_stays_as_close_to_float32_as_transformers_bfloat16(ckpt):
    llm = LLM(ckpt, dtype="bfloat16", block_size=4, max_model_len=256)
    batch = [c for c in cases() if c.name in ("2x2 grid, unpadded rows", "3x1 and 2x2", "text only")]
    check_bfloat16_close(llm, ckpt, batch, oracle)


def test_chat_uses_the_checkpoint_template(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256)
    text = "What is in this image?"
    check_chat(llm, ckpt, text, "<s>" + llava_prompt(text), llava_prompt(text), oracle)


@pytest.mark.parametrize("prompt,num_images,match", [
    (llava_prompt("two placeholders", 2), 1, r"more image placeholders than the 1 image item"),
    ("USER: no placeholder ASSISTANT:", 1, r"0 image placeholder\(s\) but 1 image item"),
    (llava_prompt("a placeholder but no image"), 0, r"holds 1 image token\(s\) \(id \d+\) that no image fills"),
])
def test_placeholders_must_match_images(ckpt, prompt, num_images, match):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256)
    check_placeholder_mismatch(llm, prompt, num_images, match, llava_prompt("ok"), (20, 30))


def test_bad_image_embeds_are_named(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256)
    for bad in (torch.zeros(24, 63), torch.zeros(0, 64), torch.zeros(2, 3, 64)):
        with pytest.raises(ValueError, match=r"image_embeds has shape .*expects floats of shape \(any, 64\)"):
            llm.generate({"prompt": llava_prompt("x"), "multi_modal_data": {"image": bad}},
                         SamplingParams(max_tokens=2), use_tqdm=False)


def test_real_tile_size_in_chunks(tmp_path):
    """llava-hf's LLaVA-1.6 image geometry (336-pixel tiles, 14-pixel patches, default pinpoints; narrow tower, tiny
    LM): a 2,928-placeholder image (672 x 672, 2x2 tiles) and a 3x1 one prefilled in 512-token chunks, exact."""
    model_dir = str(build_tiny_llava_next(
        tmp_path, seed=5, image_size=336, patch_size=14,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        text_kwargs=dict(max_position_embeddings=4096)))
    llm = LLM(model_dir, dtype="float32", block_size=16, max_model_len=4096, max_num_batched_tokens=512)
    batch = [Case("672 x 672", llava_prompt("What is in this image?"), [make_image(11, (672, 672))], 5),
             Case("3x1, tall", llava_prompt("Describe it."), [make_image(12, (250, 900))], 5)]
    outs = run(llm, model_dir, batch, oracle)
    assert outs[0].prompt_token_ids.count(llm.llm_engine.processor.info.get_image_token_id()) == 2928
