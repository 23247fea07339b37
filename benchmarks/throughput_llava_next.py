"""LLaVA-NeXT offline throughput: fovea vs transformers `generate`, same requests, same run.

throughput_llava.py's model (CLIP ViT-L/14-336 widths reduced in depth, a Llama LM of Qwen2-0.5B's dimensions, random
weights) as a LLaVA-NeXT: llava-hf's default pinpoints (1x2, 2x1, 2x2, 3x1, 1x3 tiles of 336 pixels) and a learned
`image_newline`. The benchmark's images (120-640 x 120-480 pixels) take 3 to 5 tiles and about 1,500 to 2,900
placeholders each, so both sides spend most of the run in the tower and in long prefills. fovea gets all requests at
once through `LLM.chat`; transformers runs its own `LlavaNextProcessor` and `generate` in static, left-padded batches
at each of `--hf-batch-sizes`. Prints useful output tokens/s and the ratio against transformers' best batch size.

    flock /work/bigmem.lock python benchmarks/throughput_llava_next.py [--num-requests 8] [--hf-batch-sizes 2 4 8]
                                                                       [--vision-layers 8] [--repeats 1]
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (CACHE, add_run_arguments, image_chats, print_fovea_row,  # noqa: E402
                               print_transformers_row, time_offline, time_static_batches, word_tokenizer)
from benchmarks.throughput_llava import CHAT_TEMPLATE, IMAGE_SIZE, PATCH, VOCAB, requests  # noqa: E402

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_checkpoint(path: Path, vision_layers: int) -> Path:
    if (path / "model.safetensors").exists():
        return path
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor)

    tokenizer = word_tokenizer(VOCAB - 1, ["<unk>", "<pad>", "</s>"])
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=vision_layers, num_attention_heads=16, image_size=IMAGE_SIZE,
                           patch_size=PATCH, hidden_act="quick_gelu", projection_dim=768),
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).eval().save_pretrained(path)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, image_grid_pinpoints=PINPOINTS,
                                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=CHAT_TEMPLATE).save_pretrained(path)
    return path


def run_fovea(path: Path, dtype: str, reqs, repeats: int) -> tuple[float, int, int]:
    """(best seconds, useful tokens, prompt tokens)."""
    from fovea import LLM, SamplingParams

    texts, imgs, caps = reqs
    llm = LLM(str(path), dtype=dtype, max_model_len=4096, max_num_seqs=len(texts), kv_cache_memory_bytes=2 << 30)
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    result = time_offline(llm, "chat", image_chats(texts, imgs), params, repeats, num_warmup=1)
    del llm
    gc.collect()
    return result


def run_transformers(path: Path, dtype: str, reqs, batch_size: int, repeats: int) -> float:
    from transformers import GenerationConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    texts, imgs, caps = reqs
    torch_dtype = getattr(torch, dtype)
    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
    model.generation_config.eos_token_id = None
    processor = LlavaNextProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"

    def generate(lo, hi):
        conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]
                         for t in texts[lo:hi]]
        rendered = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        inputs = processor(text=rendered, images=imgs[lo:hi], padding=True, add_special_tokens=False,
                           return_tensors="pt")
        config = GenerationConfig(max_new_tokens=max(caps[lo:hi]), do_sample=False, eos_token_id=None,
                                  pad_token_id=processor.tokenizer.pad_token_id)
        with torch.inference_mode():
            return model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  pixel_values=inputs["pixel_values"].to(torch_dtype),
                                  image_sizes=inputs["image_sizes"], generation_config=config)

    seconds = time_static_batches(generate, len(texts), batch_size, repeats, num_warmup=1)
    del model
    gc.collect()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, num_requests=8, dtypes=["bfloat16"], hf_batch_sizes=[2, 4, 8])
    parser.add_argument("--vision-layers", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = build_checkpoint(CACHE / f"llava-next-clipL{args.vision_layers}-lm0.5b", args.vision_layers)
    reqs = requests(args.num_requests)
    for dtype in args.dtypes:
        seconds, useful, prompt_tokens = run_fovea(path, dtype, reqs, args.repeats)
        ours = useful / seconds
        print(f"{args.num_requests} requests, {useful} useful output tokens, {prompt_tokens} prompt tokens, "
              f"{args.threads} threads, best of {args.repeats} run(s) each", flush=True)
        hf = {}
        for bs in args.hf_batch_sizes:
            hf[bs] = useful / run_transformers(path, dtype, reqs, bs, args.repeats)
            print_transformers_row(dtype, bs, hf[bs], useful / hf[bs])
        print_fovea_row(dtype, ours, seconds, hf)


if __name__ == "__main__":
    main()
