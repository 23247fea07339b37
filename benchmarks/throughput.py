"""BLIP-2 offline throughput: fovea vs transformers `generate`, same requests, same run.

A BLIP-2 with random weights at realistic sizes (ViT-S/14 vision tower at 224 px, a 4-layer Q-Former with 32
queries, an OPT-125m-sized language model with its 50272-token vocabulary). Every request has its own image
and its own `max_tokens`; EOS is ignored so both sides produce exactly the tokens asked for.
transformers runs static, left-padded batches (each batch generates until its longest request is done;
only the tokens a request asked for count as useful) at batch sizes 16, 32 and 64; fovea gets all requests
at once. Prints useful output tokens/s for both and the ratio against transformers' best batch size.

With `--peers transformers vllm` each engine runs in its own process, one after another (vLLM's CPU build under
the peer environment of `make bench-peers`, all requests at once as fovea; see benchmarks/peers.py), and the
output gives the machine, each engine's version and settings, and fovea / peer for each dtype.

    python benchmarks/throughput.py [--num-requests 64] [--dtypes float32 bfloat16] [--hf-batch-sizes 16 32 64]
    python benchmarks/throughput.py --dtypes bfloat16 --peers transformers vllm
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (CACHE, add_run_arguments, compare_with_transformers, images, prompts,  # noqa: E402
                               time_offline, time_static_batches, word_tokenizer)
from benchmarks.peers import (add_peer_arguments, check_peer_arguments, format_report,  # noqa: E402
                              machine_description, run_all, run_engine_dtypes, vllm_llm_options)

VOCAB = 50272


def build_checkpoint(path: Path) -> Path:
    if (path / "model.safetensors").exists():
        return path
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = word_tokenizer(50265, ["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    config = Blip2Config(
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                           image_size=224, patch_size=14),
        qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
                            cross_attention_frequency=2, encoder_hidden_size=384),
        text_config=dict(model_type="opt", hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                         num_attention_heads=12, vocab_size=VOCAB, max_position_embeddings=2048,
                         word_embed_proj_dim=768, eos_token_id=2, bos_token_id=2, pad_token_id=1),
        num_query_tokens=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    Blip2Processor(BlipImageProcessorPil(size={"height": 224, "width": 224}), tokenizer, num_query_tokens=32).save_pretrained(path)
    return path


def requests(num: int):
    caps = [16 + (i * 37) % 113 for i in range(num)]  # 16 .. 128 output tokens
    return prompts(num, 10, 50000), images(num), caps


def run_fovea(path: Path, dtype: str, reqs) -> tuple[float, int, int]:
    """(seconds, useful tokens, prompt tokens: image placeholders included, printed next to the peers' counts)"""
    from fovea import LLM, SamplingParams

    texts, imgs, caps = reqs
    llm = LLM(str(path), dtype=dtype, max_model_len=512, max_num_seqs=len(texts))
    batch = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, imgs)]
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    result = time_offline(llm, "generate", batch, params)
    del llm
    gc.collect()
    return result


def run_transformers(path: Path, dtype: str, reqs, batch_size: int) -> tuple[float, int]:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, GenerationConfig

    texts, imgs, caps = reqs
    torch_dtype = getattr(torch, dtype)
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
    processor = Blip2Processor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    for gc_ in (model.generation_config, model.language_model.generation_config):
        gc_.eos_token_id = None

    def generate(lo, hi):
        inputs = processor(images=imgs[lo:hi], text=texts[lo:hi], return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        config = GenerationConfig(max_new_tokens=max(caps[lo:hi]), do_sample=False, eos_token_id=None,
                                  pad_token_id=1)
        with torch.inference_mode():
            return model.generate(**inputs, generation_config=config)

    seconds = time_static_batches(generate, len(texts), batch_size)
    del model
    gc.collect()
    return seconds, sum(caps)


def run_vllm(path: Path, dtype: str, reqs) -> tuple[float, int, int]:
    """vLLM's offline LLM on the same requests, all at once as fovea (warm-up, prefix cache emptied); returns
    (seconds, useful tokens, prompt tokens)."""
    from vllm import LLM, SamplingParams

    texts, imgs, caps = reqs
    llm = LLM(str(path), dtype=dtype, max_model_len=512, max_num_seqs=len(texts), **vllm_llm_options())
    batch = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, imgs)]
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    result = time_offline(llm, "generate", batch, params)
    del llm  # shuts its engine process down before the next dtype's starts
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, num_requests=64, dtypes=["float32", "bfloat16"], hf_batch_sizes=[16, 32, 64],
                      repeats=False)
    add_peer_arguments(parser)
    args = parser.parse_args()
    check_peer_arguments(parser, args)
    torch.set_num_threads(args.threads)
    path = build_checkpoint(CACHE / "blip2-opt125m-vits14")
    if args.peers:
        results = run_all(Path(__file__), sys.argv[1:], args.peers, args.peer_python, args.threads)
        print(format_report(f"BLIP-2 offline throughput, {args.num_requests} requests, useful output tokens/s",
                            results, machine_description()))
        return
    reqs = requests(args.num_requests)

    def fovea(dtype):
        return run_fovea(path, dtype, reqs)

    def vllm(dtype):
        return run_vllm(path, dtype, reqs)

    def transformers(dtype, batch_size):
        return run_transformers(path, dtype, reqs, batch_size)

    if args.engine:
        run_engine_dtypes(args, reqs, fovea, vllm, transformers).write(args.result)
        return
    print(f"{args.num_requests} requests, {sum(reqs[2])} useful output tokens, {args.threads} threads")
    compare_with_transformers(args.dtypes, args.hf_batch_sizes, transformers, fovea)


if __name__ == "__main__":
    main()
