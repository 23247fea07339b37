"""fovea's engine against transformers' Qwen2_5_VLForConditionalGeneration on a tiny random checkpoint.

The checkpoint has grouped-query attention, mrope_section (2, 3, 3), and a vision tower with both window- and
full-attention blocks. Every case (an image, extreme aspect ratios, sizes below min_pixels and above max_pixels,
two images, a video with an odd frame count, a video and an image, text only) goes through `LLM.generate` in
one batch; greedy ids must equal transformers' batch-size-1 reference and logprobs must match log_softmax of
its raw logits within 1e-4 (float32). The same holds with prefill chunks that split images, under
preemption, and with prefix caching (which must tell images, and a video's frame rate, apart). `LLM.chat`
and a video file given by path go the same way.
"""
from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from fovea import LLM, SamplingParams
from fovea.multimodal.hashing import hash_mm_item
from fovea.multimodal.media import LoadedVideo
from tests.e2e.qwen_cases import Case, cases, chat, frames, image, reference_inputs, write_video
from tests.oracle.qwen2_5_vl import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    build_tiny_qwen2_5_vl,
    hf_model,
    hf_reference,
)

LOGPROBS = 3
ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_engine"), seed=0))


@pytest.fixture(scope="module")
def references(ckpt):
    """Case name -> (expanded input ids, greedy ids, per-step logprobs), computed once per case."""
    memo: dict[str, tuple] = {}

    def get(case: Case):
        if case.name not in memo:
            ids, mm = reference_inputs(ckpt, case)
            memo[case.name] = (ids.tolist(), *hf_reference(ckpt, ids, case.max_tokens, **mm))
        return memo[case.name]

    return get


def run(llm: LLM, batch: list[Case], references) -> list:
    params = [SamplingParams(temperature=0.0, max_tokens=c.max_tokens, logprobs=LOGPROBS, ignore_eos=True)
              for c in batch]
    outs = llm.generate([c.prompt_dict() for c in batch], params, use_tqdm=False)
    for case, out in zip(batch, outs):
        check(case, out, references(case))
    return outs


def check(case: Case, out, reference) -> None:
    ref_prompt_ids, ref_ids, ref_logprobs = reference
    assert out.prompt_token_ids == ref_prompt_ids, f"{case.name}: prompt ids"
    got = out.outputs[0]
    assert got.token_ids == ref_ids, case.name
    assert got.finish_reason == "length" and len(got.logprobs) == len(ref_ids)
    for step, (entry, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
        top = ref.topk(LOGPROBS).indices.tolist()
        assert set(top) <= set(entry), f"{case.name}, step {step}: top-{LOGPROBS} {top} vs {sorted(entry)}"
        for token_id, lp in entry.items():
            err = abs(lp.logprob - ref[token_id].item())
            assert err < ATOL, f"{case.name}, step {step}, token {token_id}: logprob off by {err:.2e}"


def test_one_batch_matches_transformers(ckpt, references):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256)
    batch = cases()
    outs = run(llm, batch, references)
    # the tiny model must not be degenerate, or equality proves little
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == len(batch)


def test_bfloat16_stays_as_close_to_float32_as_transformers_bfloat16(ckpt, references):
    # bfloat16 runs other kernels than float32 (fovea's AMX linear where the sizes allow, oneDNN elsewhere):
    # its first-step logprobs must be no further from transformers' float32 ones than transformers' own
    # bfloat16 model is (up to a factor for the different summation orders)
    batch = [c for c in cases() if c.name in ("image", "two images", "odd-frame video", "text only")]
    llm = LLM(ckpt, dtype="bfloat16", block_size=4, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=LOGPROBS, ignore_eos=True)
    outs = llm.generate([c.prompt_dict() for c in batch], params, use_tqdm=False)
    for case, out in zip(batch, outs):
        ids, mm = reference_inputs(ckpt, case)
        exact = references(case)[2][0]
        _, (hf_bf16,) = hf_reference(ckpt, ids, 1, dtype=torch.bfloat16, **mm)
        entry = out.outputs[0].logprobs[0]
        tokens = list(entry)
        ours = max(abs(entry[t].logprob - exact[t].item()) for t in tokens)
        theirs = max(abs(hf_bf16[t].item() - exact[t].item()) for t in tokens)
        assert ours <= 3 * theirs + 0.02, f"{case.name}: fovea bf16 off by {ours:.3f}, transformers bf16 {theirs:.3f}"


def test_chunked_prefill_splits_images(ckpt, references):
    budget = 10
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256, max_num_batched_tokens=budget)
    batch = cases()
    run(llm, batch, references)
    features = [f for c in batch for f in llm.llm_engine.input_processor.process(
        "probe", c.prompt_dict(), SamplingParams(max_tokens=1)).mm_features]
    assert max(f.length for f in features) > 2 * budget  # some item spans at least three steps


def test_preemption_keeps_results_exact(ckpt, references):
    # KV room for 156 tokens (39 blocks of 4 past the null block), prompts of 33 to 75: preempted, recomputed
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128, num_kv_blocks=40, enable_prefix_caching=False)
    run(llm, cases(), references)
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_prefix_caching_tells_images_apart(ckpt, references):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256)
    prompt = f"{IMAGE_PLACEHOLDER}Describe the picture in one long sentence, please."
    first = Case("cache first", prompt, [image(20, 150, 120)], max_tokens=6)
    other = Case("cache other", prompt, [image(21, 150, 120)], max_tokens=6)
    run(llm, [first], references)
    # same text, another image: the image comes first, so no block may be reused
    assert run(llm, [other], references)[0].num_cached_tokens == 0
    # the same image and text again: a hit past the image, and still exact
    again = run(llm, [first], references)[0]
    assert again.num_cached_tokens >= len(again.prompt_token_ids) - 4
    # the same image, another question: the image blocks are shared, the positions after it still right
    follow_up = Case("cache follow-up", f"{IMAGE_PLACEHOLDER}What colour dominates?", first.images, max_tokens=6)
    assert run(llm, [follow_up], references)[0].num_cached_tokens > 0


def test_prefix_caching_tells_frame_rates_apart(ckpt, references):
    # the frames are equal but the rate differs, and with it the temporal positions: no sharing
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256)
    clip = frames(22, 4, 60, 90)
    prompt = f"{VIDEO_PLACEHOLDER}What happens next?"
    slow = Case("video 2 fps", prompt, videos=[LoadedVideo(clip, fps=2.0)], max_tokens=5)
    fast = Case("video 24 fps", prompt, videos=[LoadedVideo(clip, fps=24.0)], max_tokens=5)
    run(llm, [slow], references)
    assert run(llm, [fast], references)[0].num_cached_tokens == 0
    assert run(llm, [slow], references)[0].num_cached_tokens > 0


def _data_url(img) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_equals_generate_on_the_same_prompt(ckpt, references):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256)
    img = image(30, 180, 100)
    conversations = [
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(img)}},
                                      {"type": "text", "text": "Describe it."}]}],
        [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                      {"type": "image_pil", "image_pil": img}]}],
        [{"role": "user", "content": "Hello there."}],
    ]
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=LOGPROBS, ignore_eos=True)
    chatted = llm.chat(conversations, params, use_tqdm=False)
    expected_prompts = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + chat(f"{IMAGE_PLACEHOLDER}Describe it."),
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n" + chat(f"And this one?{IMAGE_PLACEHOLDER}"),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + chat("Hello there."),
    ]
    assert [o.prompt for o in chatted] == expected_prompts
    for i, (prompt, out) in enumerate(zip(expected_prompts, chatted)):
        case = Case(f"chat {i}", prompt, [img] if IMAGE_PLACEHOLDER in prompt else [], max_tokens=6)
        check(case, out, references(case))
        generated = llm.generate(case.prompt_dict(), params, use_tqdm=False)[0]
        assert generated.prompt_token_ids == out.prompt_token_ids
        assert generated.outputs[0].token_ids == out.outputs[0].token_ids
    single = llm.chat(conversations[0], params, use_tqdm=False)  # one conversation, not a list of them
    assert single[0].outputs[0].token_ids == chatted[0].outputs[0].token_ids


def test_video_file_through_generate(ckpt, references, tmp_path):
    # 12 frames at 10 fps (1.2 s), sampled at the default 2 fps: 2.4 frames, raised to min_frames 4 (rate 10/3)
    path = write_video(tmp_path / "clip.mp4", frames(40, 12, 64, 48), fps=10)
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256)
    case = Case("video file", chat(f"{VIDEO_PLACEHOLDER}What moves?"), videos=[str(path)], max_tokens=7)
    out = run(llm, [case], references)[0]
    video, = llm.llm_engine.input_processor.process("probe", case.prompt_dict(), SamplingParams(max_tokens=1)).mm_features
    assert video.data["video_grid_thw"].tolist()[0][0] == 2
    # at 8 fps the file gives 8 frames and another rate, so another answer, and no cache hit
    faster = llm.generate({**case.prompt_dict(), "mm_processor_kwargs": {"fps": 8.0}},
                          SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True), use_tqdm=False)[0]
    assert faster.num_cached_tokens <= video.offset and len(faster.prompt_token_ids) > len(out.prompt_token_ids)


# ---------------------------------------------------------------------------------------------- input forms


def test_video_forms_hash_alike_and_share_the_cache(ckpt, references):
    """A (T, H, W, 3) array, the same frames as a list of PIL images, and a LoadedVideo without a rate are one
    video: equal hashes, so the second and third requests reuse the first one's blocks, with equal answers."""
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256)
    clip = frames(50, 3, 80, 60)
    prompt = f"{VIDEO_PLACEHOLDER}What is it?"
    forms = [clip, [Image.fromarray(f) for f in clip], LoadedVideo(clip)]
    outs = [run(llm, [Case(f"video form {i}", prompt, videos=[form], max_tokens=5)], references)[0]
            for i, form in enumerate(forms)]
    assert outs[0].num_cached_tokens == 0 and all(o.num_cached_tokens > 0 for o in outs[1:])
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1


def test_precomputed_embeddings_as_dict_items(ckpt, references):
    """transformers' vision tower output, given as {"<modality>_embeds", "<modality>_grid_thw"}, answers as the
    pixels do; the grid as a list or a tensor is the same item (a prefix hit)."""
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256)
    case = next(c for c in cases() if c.name == "video and image")
    references(case)  # the pixels' answer, which the embedding items below (under the same name) must give
    _, mm = reference_inputs(ckpt, case)
    visual = hf_model(ckpt).model
    with torch.no_grad():
        image_embeds = visual.get_image_features(mm["pixel_values"], mm["image_grid_thw"]).pooler_output[0]
        video_embeds = visual.get_video_features(mm["pixel_values_videos"], mm["video_grid_thw"]).pooler_output[0]
    video_item = {"video_embeds": video_embeds, "video_grid_thw": mm["video_grid_thw"],
                  "second_per_grid_ts": float(mm["second_per_grid_ts"][0])}
    embedded = Case(case.name, case.prompt, [{"image_embeds": image_embeds, "image_grid_thw": mm["image_grid_thw"]}],
                    [video_item], case.max_tokens)
    assert run(llm, [embedded], references)[0].num_cached_tokens == 0  # checked against the pixel reference
    as_list = Case(case.name, case.prompt, [{"image_embeds": image_embeds,
                                             "image_grid_thw": mm["image_grid_thw"][0].tolist()}],
                   [{**video_item, "video_grid_thw": mm["video_grid_thw"].tolist()}], case.max_tokens)
    assert run(llm, [as_list], references)[0].num_cached_tokens > 0


def test_hashes_of_videos_and_embedding_dicts():
    clip = frames(60, 2, 8, 6)
    changed = clip.copy()
    changed[1, 2, 3, 0] ^= 1
    video = hash_mm_item("video", LoadedVideo(clip, 24))
    assert hash_mm_item("video", LoadedVideo(clip.copy(), 24.0)) == video
    others = [LoadedVideo(clip, 25.0), LoadedVideo(clip), LoadedVideo(changed, 24.0), LoadedVideo(clip[:1], 24.0)]
    assert len({video} | {hash_mm_item("video", v) for v in others}) == 5
    assert hash_mm_item("video", LoadedVideo(clip, 24.0), fps=4.0) != video  # options count too
    embeds = torch.randn(6, 8)
    item = {"image_embeds": embeds, "image_grid_thw": torch.tensor([[1, 4, 6]])}
    digest = hash_mm_item("image", item)
    same = [{"image_grid_thw": [1, 4, 6], "image_embeds": embeds.clone()},
            {"image_embeds": embeds.numpy(), "image_grid_thw": torch.tensor([1, 4, 6])}]
    assert all(hash_mm_item("image", s) == digest for s in same)
    different = [{**item, "image_grid_thw": [1, 6, 4]}, {**item, "image_embeds": embeds + 1e-3},
                 {**item, "image_embeds": embeds.double()}, {**item, "second_per_grid_ts": 1.0}]
    assert len({digest} | {hash_mm_item("image", d) for d in different}) == 5
    assert hash_mm_item("video", {"s": 1}) == hash_mm_item("video", {"s": 1.0}) != hash_mm_item("video", {"s": 2})
    for bad, needle in [({"image_grid_thw": "abc"}, "image_grid_thw must be integers"),
                        ({"x": object()}, "cannot hash x=object"), ({1: torch.zeros(1)}, "keys must be str")]:
        with pytest.raises(ValueError, match=needle):
            hash_mm_item("image", bad)


def test_bad_inputs_are_value_errors_naming_the_problem(ckpt, tmp_path):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256)
    video, image_prompt = f"{VIDEO_PLACEHOLDER}hi", f"{IMAGE_PLACEHOLDER}hi"
    clip = frames(70, 5, 40, 30)
    bad = {
        "tensor video": ({"prompt": video, "multi_modal_data": {"video": torch.zeros(2, 8, 8, 3)}}, "torch tensor"),
        "tensor image": ({"prompt": image_prompt, "multi_modal_data": {"image": torch.zeros(3, 8, 8)}},
                         r"cannot take torch\.Tensor as an image; pass an image \(PIL\.Image\.Image, numpy\.ndarray "
                         r".*file path.*bytes.*'data:image/\.\.\.;base64,\.\.\.' URL\), or .*'image_embeds'"),
        "fps not a number": ({"prompt": video, "multi_modal_data": {"video": clip},
                              "mm_processor_kwargs": {"fps": "x"}}, r"fps must be a positive number .*got 'x'"),
        "fps not a number, video file": ({"prompt": video, "multi_modal_data": {"video": b"not a video"},
                                          "mm_processor_kwargs": {"fps": "x"}}, "fps must be a positive number"),
        "fps not a number, image only": ({"prompt": image_prompt, "multi_modal_data": {"image": clip[0]},
                                          "mm_processor_kwargs": {"fps": "x"}}, "fps must be a positive number"),
        "fps infinite": ({"prompt": video, "multi_modal_data": {"video": clip},
                          "mm_processor_kwargs": {"fps": float("inf")}}, "fps must be a positive number"),
        "over max_frames": ({"prompt": video, "multi_modal_data": {"video": clip},
                             "mm_processor_kwargs": {"max_frames": 4}}, "max_frames=4"),
        "unknown option": ({"prompt": video, "multi_modal_data": {"video": clip},
                            "mm_processor_kwargs": {"fsp": 4}}, r"unknown mm_processor_kwargs \['fsp'\]"),
        "missing file": ({"prompt": video, "multi_modal_data": {"video": str(tmp_path / "gone.mp4")}}, "gone.mp4"),
        "corrupt file": ({"prompt": video, "multi_modal_data": {"video": b"not a video"}}, "could not decode"),
        "one image as video": ({"prompt": video, "multi_modal_data": {"video": clip[0]}}, "looks like one image"),
        "embeds without grid": ({"prompt": image_prompt, "multi_modal_data": {"image": {"image_embeds":
                                 torch.zeros(4, 64)}}}, "image_grid_thw"),
        "placeholders": ({"prompt": image_prompt, "multi_modal_data": {"video": clip}}, "video placeholder"),
        "modality": ({"prompt": video, "multi_modal_data": {"audio": b"x"}}, "modalities it takes: image, video"),
    }
    good = {"prompt": video, "multi_modal_data": {"video": clip}}
    for name, (prompt, needle) in bad.items():
        with pytest.raises(ValueError, match=needle):
            llm.generate([good, prompt], SamplingParams(max_tokens=2), use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests(), name
    out = llm.generate(good, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2


def test_a_model_wide_fps_must_be_a_positive_number(ckpt):
    with pytest.raises(ValueError, match=r"fps must be a positive number .*got 'x'"):
        LLM(ckpt, dtype="float32", block_size=4, max_model_len=256, mm_processor_kwargs={"fps": "x"})
