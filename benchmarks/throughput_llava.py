"""LLaVA-1.5 offline throughput: fovea vs transformers `generate`, same requests, same run.

A LLaVA-1.5 with random weights at realistic sizes: CLIP ViT-L/14-336's tower (width 1024, 16 heads, MLP 4096,
patch 14 on 336 x 336: 576 image tokens) reduced in depth (`--vision-layers`, feature layer -2 as released), the
two-layer GELU projector, and a Llama LM of Qwen2-0.5B's dimensions (hidden 896, 24 layers, 14 query / 2 KV heads,
MLP 4864) with Llama's 32,064-token vocabulary. Every request is one chat turn with its own image (sizes vary; CLIP
crops each to 336) and its own `max_tokens`; EOS is ignored so both sides produce exactly the tokens asked for.

fovea gets all requests at once through `LLM.chat`. transformers runs its own `LlavaProcessor` (CLIP's PIL image
processor) and `generate` in static, left-padded batches at each of `--hf-batch-sizes` (each runs until its longest
request is done; only the tokens a request asked for count as useful). Preprocessing is inside the timed region on
both sides. Prints useful output tokens/s for both and the ratio against transformers' best batch size; with
`--repeats N` the fastest of N runs counts, on both sides alike.

    python benchmarks/throughput_llava.py [--num-requests 16] [--dtypes bfloat16] [--hf-batch-sizes 4 8 16]
                                          [--vision-layers 8] [--repeats 1]
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (CACHE, add_run_arguments, compare_with_transformers, image_chats,  # noqa: E402
                               images, prompts, time_offline, time_static_batches, word_tokenizer)

VOCAB = 32064
IMAGE_SIZE, PATCH = 336, 14
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_checkpoint(path: Path, vision_layers: int) -> Path:
    if (path / "model.safetensors").exists():
        return path
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = word_tokenizer(VOCAB - 1, ["<unk>", "<pad>", "</s>"])
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=vision_layers, num_attention_heads=16, image_size=IMAGE_SIZE,
                           patch_size=PATCH, hidden_act="quick_gelu", projection_dim=768),
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(path)
    return path


def requests(num: int):
    caps = [16 + (i * 37) % 113 for i in range(num)]  # 16 .. 128 output tokens
    texts = prompts(num, 10, VOCAB - 100)
    return texts, images(num), caps


def run_fovea(path: Path, dtype: str, reqs, repeats: int = 1) -> tuple[float, int]:
    from fovea import LLM, SamplingParams

    texts, imgs, caps = reqs
    llm = LLM(str(path), dtype=dtype, max_model_len=1024, max_num_seqs=len(texts), kv_cache_memory_bytes=2 << 30)
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    seconds, useful, _ = time_offline(llm, "chat", image_chats(texts, imgs), params, repeats)
    del llm
    gc.collect()
    return seconds, useful


def run_transformers(path: Path, dtype: str, reqs, batch_size: int, repeats: int = 1) -> tuple[float, int]:
    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

    texts, imgs, caps = reqs
    torch_dtype = getattr(torch, dtype)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
    model.generation_config.eos_token_id = None
    processor = LlavaProcessor.from_pretrained(path)
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
                                  pixel_values=inputs["pixel_values"].to(torch_dtype), generation_config=config)

    seconds = time_static_batches(generate, len(texts), batch_size, repeats)
    del model
    gc.collect()
    return seconds, sum(caps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, num_requests=16, dtypes=["bfloat16"], hf_batch_sizes=[4, 8, 16])
    parser.add_argument("--vision-layers", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = build_checkpoint(CACHE / f"llava1.5-clipL{args.vision_layers}-lm0.5b", args.vision_layers)
    reqs = requests(args.num_requests)
    print(f"{args.num_requests} requests, {sum(reqs[2])} useful output tokens, 576 image tokens each, "
          f"{args.threads} threads, best of {args.repeats} run(s) each")
    compare_with_transformers(args.dtypes, args.hf_batch_sizes,
                              lambda dtype, bs: run_transformers(path, dtype, reqs, bs, args.repeats),
                              lambda dtype: run_fovea(path, dtype, reqs, args.repeats))

if __name__ == "__main__":
    main()
