"""BLIP-2 over Flan-T5 offline throughput: fovea vs transformers `generate`, same requests, same run.

A BLIP-2 with random weights: the vision tower and Q-Former of `benchmarks/throughput.py` (ViT-S/14 at 224 px, a
4-layer Q-Former, 32 queries) and a language model with Flan-T5-base's dimensions (d_model 768, 12 heads of 64,
gated-GELU d_ff 2048, 12 encoder + 12 decoder layers, 32128-token vocabulary, its own lm_head). Every request has
its own image, prompt (4 to 40 words, the encoder's input after the 32 query rows) and `max_tokens`; EOS is
ignored so both sides produce exactly the tokens asked for.

transformers runs static, padded batches (each batch generates until its longest request is done; only the
tokens a request asked for count as useful) at each of `--hf-batch-sizes`; fovea gets all requests at once.
Each configuration runs `--repeats` times and its fastest run counts. Prints useful output tokens/s and the ratio
against transformers' best batch size.

    flock /work/bigmem.lock python benchmarks/throughput_t5.py [--num-requests 32] [--dtypes float32 bfloat16]
                                                               [--hf-batch-sizes 8 16 32] [--repeats 1]
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (CACHE, add_run_arguments, compare_with_transformers, images, prompts,  # noqa: E402
                               time_offline, time_static_batches)

VOCAB = 32128
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's ids 0..2; the decoder starts from <pad>


def t5_word_tokenizer(vocab_size: int):
    """A word-level tokenizer in T5's shape: `w<id>` words, `</s>` appended, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(T5_SPECIALS)}
    for i in range(len(T5_SPECIALS), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=512)


def build_checkpoint(path: Path) -> Path:
    if (path / "model.safetensors").exists():
        return path
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = t5_word_tokenizer(VOCAB - 100)  # Flan-T5's 32100 tokens in a 32128-row table
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    config = Blip2Config(
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                           image_size=224, patch_size=14),
        qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
                            cross_attention_frequency=2, encoder_hidden_size=384),
        text_config=dict(model_type="t5", vocab_size=VOCAB, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                         num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
        num_query_tokens=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    Blip2Processor(BlipImageProcessorPil(size={"height": 224, "width": 224}), tokenizer,
                   num_query_tokens=32).save_pretrained(path)
    return path


def requests(num: int):
    caps = [8 + (i * 37) % 57 for i in range(num)]  # 8 .. 64 output tokens: answers and captions
    return prompts(num, 10, VOCAB - 200), images(num), caps


def run_fovea(path: Path, dtype: str, reqs, repeats: int) -> tuple[float, int]:
    from fovea import LLM, SamplingParams

    texts, imgs, caps = reqs
    llm = LLM(str(path), dtype=dtype, max_num_seqs=len(texts), max_model_len=256)
    batch = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, imgs)]
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    seconds, useful, _ = time_offline(llm, "generate", batch, params, repeats)
    del llm
    gc.collect()
    return seconds, useful


def run_transformers(path: Path, dtype: str, reqs, batch_size: int, repeats: int) -> tuple[float, int]:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, GenerationConfig

    texts, imgs, caps = reqs
    torch_dtype = getattr(torch, dtype)
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
    processor = Blip2Processor.from_pretrained(path)
    for gc_ in (model.generation_config, model.language_model.generation_config):
        gc_.eos_token_id = None

    def generate(lo, hi):
        inputs = processor(images=imgs[lo:hi], text=texts[lo:hi], return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        config = GenerationConfig(max_new_tokens=max(caps[lo:hi]), do_sample=False, eos_token_id=None,
                                  pad_token_id=0, decoder_start_token_id=0)
        with torch.inference_mode():
            return model.generate(**inputs, generation_config=config)

    seconds = time_static_batches(generate, len(texts), batch_size, repeats)
    del model
    gc.collect()
    return seconds, sum(caps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, num_requests=32, dtypes=["float32", "bfloat16"], hf_batch_sizes=[8, 16, 32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = build_checkpoint(CACHE / "blip2-flan-t5-base-vits14")
    reqs = requests(args.num_requests)
    print(f"{args.num_requests} requests, {sum(reqs[2])} useful output tokens, {args.threads} threads")
    compare_with_transformers(args.dtypes, args.hf_batch_sizes,
                              lambda dtype, bs: run_transformers(path, dtype, reqs, bs, args.repeats),
                              lambda dtype: run_fovea(path, dtype, reqs, args.repeats))

if __name__ == "__main__":
    main()
