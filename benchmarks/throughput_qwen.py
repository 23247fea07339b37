"""Qwen2.5-VL offline throughput: fovea vs transformers `generate`, same requests, same run.

A Qwen2.5-VL with random weights at realistic sizes: a language model with Qwen2-0.5B's dimensions (hidden 896,
24 layers, 14 query / 2 KV heads, MLP 4864, 151936-token vocabulary, tied embeddings) and a reduced vision tower
(8 blocks of width 640, two of them full attention, window attention in the rest, merged into 896). Every request
is one chat turn with its own image (sizes vary from 120 to 640 pixels a side, so from 20 to `--max-pixels`'s
worth of tokens) and its own `max_tokens`; EOS is ignored so both sides produce exactly the tokens asked for.

fovea gets all requests at once through `LLM.chat`. transformers has no Qwen processor without torchvision, so
its inputs are built the way fovea's equal preprocessing builds them: the chat template, transformers' own
`Qwen2VLImageProcessorPil`, each `<|image_pad|>` expanded to its image's token count; then static, left-padded
batches (each runs until its longest request is done; only the tokens a request asked for count as useful) at
each of `--hf-batch-sizes`. Preprocessing is inside the timed region on both sides. Prints useful output
tokens/s for both and the ratio against transformers' best batch size.

With `--repeats N` every configuration (fovea, and transformers at each batch size) is timed N times on the same
loaded model and its fastest run counts, on both sides alike: on a shared machine the slowest runs measure the
neighbours, not the code.

With `--peers transformers vllm` each engine runs in its own process, one after another (vLLM's CPU build under
the peer environment of `make bench-peers`, all requests at once through its `LLM.chat` as fovea, the image's
`min_pixels` / `max_pixels` from the checkpoint's processor config; see benchmarks/peers.py), and the output gives
the machine, each engine's version and settings, and fovea / peer for each dtype.

    python benchmarks/throughput_qwen.py [--num-requests 32] [--dtypes float32 bfloat16] [--hf-batch-sizes 8 16 32]
                                         [--repeats 1]
    python benchmarks/throughput_qwen.py --dtypes bfloat16 --peers transformers vllm
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (CACHE, add_run_arguments, compare_with_transformers, image_chats,  # noqa: E402
                               images, prompts, time_offline, time_static_batches, word_tokenizer)
from benchmarks.peers import (add_peer_arguments, check_peer_arguments, format_report,  # noqa: E402
                              machine_description, run_all, run_engine_dtypes, vllm_llm_options)

VOCAB = 151936
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
MIN_PIXELS = 28 * 28 * 16
MAX_PIXELS = 28 * 28 * 256  # at most 256 LLM tokens per image
# Qwen2-VL's turn format; media parts become a vision_start, pad, vision_end triple
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def benchmark_config():
    """(Qwen2_5_VLConfig, tokenizer) of the benchmark checkpoint."""
    from transformers import Qwen2_5_VLConfig

    tokenizer = word_tokenizer(VOCAB - len(QWEN_SPECIALS) - 64, ["<unk>", "<pad>", "</s>"])
    tokenizer.add_tokens(QWEN_SPECIALS, special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=8, hidden_size=640, num_heads=10, intermediate_size=1792, out_hidden_size=896,
                           window_size=112, fullatt_block_indexes=[3, 7], tokens_per_second=2),
        text_config=dict(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_parameters=dict(rope_type="default", mrope_section=[8, 12, 12], rope_theta=1e6),
                         bos_token_id=ids["<|im_end|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=1),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    return config, tokenizer


def video_processor_config(image_config: dict) -> dict:
    """The video processor's options: the image processor's (same pixel limits, patches, normalisation) under
    transformers' Qwen2VLVideoProcessor. vLLM's Qwen2.5-VL processor loads a video processor even for image-only
    prompts and fails without its config; transformers 5's `save_pretrained` of the whole processor would write
    one, but its video processor needs torchvision, which fovea's environment never has, so it is written here."""
    options = {k: v for k, v in image_config.items() if k != "image_processor_type"}
    return {**options, "video_processor_type": "Qwen2VLVideoProcessor", "min_frames": 4, "max_frames": 768,
            "do_sample_frames": False}


def build_checkpoint(path: Path, max_pixels: int) -> Path:
    """The benchmark checkpoint, written once into the cache. One cached before the video processor config was
    written gets that file now, from its own image processor config (the weights are not rewritten)."""
    video_config = path / "video_preprocessor_config.json"
    if (path / "model.safetensors").exists():
        if not video_config.exists():
            image_config = json.loads((path / "processor_config.json").read_text())["image_processor"]
            video_config.write_text(json.dumps(video_processor_config(image_config), indent=2))
        return path
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config, tokenizer = benchmark_config()
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_config = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=max_pixels).to_dict()
    processor_config = {"processor_class": "Qwen2_5_VLProcessor", "image_processor": image_config}
    (path / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    video_config.write_text(json.dumps(video_processor_config(image_config), indent=2))
    return path


def requests(num: int):
    caps = [16 + (i * 37) % 113 for i in range(num)]  # 16 .. 128 output tokens
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
                     for text in prompts(num, 10, 100000)]
    return conversations, images(num), caps


def chats(reqs) -> list[list[dict]]:
    """The requests as OpenAI-style messages: the template's {"type": "image"} parts as image_pil parts."""
    conversations, imgs, _ = reqs
    return image_chats([conv[0]["content"][1]["text"] for conv in conversations], imgs)


def run_fovea(path: Path, dtype: str, reqs, repeats: int = 1) -> tuple[float, int, int]:
    """(best seconds, useful tokens, prompt tokens: image placeholders included, printed next to the peers')"""
    from fovea import LLM, SamplingParams

    conversations, _, caps = reqs
    llm = LLM(str(path), dtype=dtype, max_model_len=1024, max_num_seqs=len(conversations),
              kv_cache_memory_bytes=2 << 30)
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    result = time_offline(llm, "chat", chats(reqs), params, repeats)
    del llm
    gc.collect()
    return result


def run_transformers(path: Path, dtype: str, reqs, batch_size: int, max_pixels: int,
                     repeats: int = 1) -> tuple[float, int]:
    from transformers import AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    conversations, imgs, caps = reqs
    torch_dtype = getattr(torch, dtype)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
    model.generation_config.eos_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=max_pixels)
    image_token_id = model.config.image_token_id
    merge_unit = model.config.vision_config.spatial_merge_size ** 2

    def generate(lo, hi):
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations[lo:hi]]
        pixels = image_processor(images=imgs[lo:hi], return_tensors="pt")
        counts = (pixels["image_grid_thw"].prod(-1) // merge_unit).tolist()
        texts = [t.replace("<|image_pad|>", "<|image_pad|>" * n, 1) for t, n in zip(texts, counts)]
        inputs = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        # transformers 5 needs these to compute M-RoPE positions (without them it falls back to 1-D ones)
        mm_token_type_ids = (inputs["input_ids"] == image_token_id).int()
        config = GenerationConfig(max_new_tokens=max(caps[lo:hi]), do_sample=False, eos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id)
        with torch.inference_mode():
            return model.generate(**inputs, pixel_values=pixels["pixel_values"].to(torch_dtype),
                                  image_grid_thw=pixels["image_grid_thw"], mm_token_type_ids=mm_token_type_ids,
                                  generation_config=config)

    seconds = time_static_batches(generate, len(conversations), batch_size, repeats)
    del model
    gc.collect()
    return seconds, sum(caps)


def run_vllm(path: Path, dtype: str, reqs, max_pixels: int, repeats: int = 1) -> tuple[float, int, int]:
    """vLLM's offline LLM.chat on the same messages, all at once as fovea (warm-up, prefix cache emptied before
    each timed run); returns (best seconds, useful tokens, prompt tokens)."""
    from vllm import LLM, SamplingParams

    conversations, _, caps = reqs
    llm = LLM(str(path), dtype=dtype, max_model_len=1024, max_num_seqs=len(conversations),
              **vllm_llm_options(MIN_PIXELS, max_pixels))
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    result = time_offline(llm, "chat", chats(reqs), params, repeats)
    del llm  # shuts its engine process down before the next dtype's starts
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, num_requests=32, dtypes=["float32", "bfloat16"], hf_batch_sizes=[8, 16, 32])
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
    add_peer_arguments(parser)
    args = parser.parse_args()
    check_peer_arguments(parser, args)
    torch.set_num_threads(args.threads)
    path = build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{args.max_pixels}", args.max_pixels)
    if args.peers:
        results = run_all(Path(__file__), sys.argv[1:], args.peers, args.peer_python, args.threads)
        print(format_report(f"Qwen2.5-VL offline throughput, {args.num_requests} requests, images up to "
                            f"{args.max_pixels} pixels, best of {args.repeats}, useful output tokens/s",
                            results, machine_description()))
        return
    reqs = requests(args.num_requests)

    def fovea(dtype):
        return run_fovea(path, dtype, reqs, args.repeats)

    def vllm(dtype):
        return run_vllm(path, dtype, reqs, args.max_pixels, args.repeats)

    def transformers(dtype, batch_size):
        return run_transformers(path, dtype, reqs, batch_size, args.max_pixels, args.repeats)

    if args.engine:
        run_engine_dtypes(args, reqs, fovea, vllm, transformers, settings={"repeats": str(args.repeats)}).write(
            args.result)
        return
    print(f"{args.num_requests} requests, {sum(reqs[2])} useful output tokens, images up to {args.max_pixels} "
          f"pixels, {args.threads} threads, best of {args.repeats} run(s) each")
    compare_with_transformers(args.dtypes, args.hf_batch_sizes, transformers, fovea)


if __name__ == "__main__":
    main()
