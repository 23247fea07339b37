"""Pre-train a small OPT language model on text, to be frozen under stage 2.

BLIP-2 reads images into a frozen LLM that already knows the language. For the demo that language is the
shapes captions and question/answer pairs, so a few minutes of causal-LM training on them is enough. Texts are
written as the LLM sees them in stage 2 (`</s>` + text + `</s>`, questions as "Question: ... Answer: ...") and
packed end to end into fixed-length sequences, so that every learned position up to `seq_len` is trained:
in stage 2 the text starts after the image's query tokens, not at position 0.

Packing keeps the texts of one scene together: its caption first, then its questions in a random order. A
model trained on unrelated texts packed together learns that whatever precedes `</s>` is noise to ignore,
which is exactly where stage 2 puts the image; here every answer can be read off the caption before it, so
the model learns to read the context before `</s>` instead, which is what the image queries then provide.

The result is an `OPTForCausalLM` directory (transformers' names, q/k/v separate) with its tokenizer, which
already holds the `<image>` placeholder stage 2 needs.

    python -m fovea.training.lm_pretrain --data shapes/train.jsonl --out runs/opt --steps 1500
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import OPTConfig

from fovea.models.opt import OPTForCausalLM
from fovea.training.export import unpack_opt_weights
from fovea.training.lm import opt_logits
from fovea.training.losses import lm_loss
from fovea.training.optim import build_optimizer, build_scheduler
from fovea.training.stage1 import init_bert_weights
from fovea.training.tokenization import build_opt_tokenizer

IMAGE_TOKEN = "<image>"
VQA_PROMPT = "Question: {} Answer:"


def scene_documents(path: str | Path, vqa_prompt: str = VQA_PROMPT) -> list[list[str]]:
    """Per record of a shapes JSONL: its caption and every "Question: q Answer: a" about it."""
    documents = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        documents.append([record["caption"]] + [f"{vqa_prompt.format(qa['question'])} {qa['answer']}"
                                                for qa in record.get("qa", [])])
    return documents


def shapes_texts(path: str | Path, vqa_prompt: str = VQA_PROMPT) -> list[str]:
    """Every caption and every "Question: q Answer: a" of a shapes JSONL."""
    return [text for document in scene_documents(path, vqa_prompt) for text in document]


def pack(documents: list[list[list[int]]], seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(num_sequences, seq_len): documents in a random order, each one's first text (the caption) first and
    the others after it in a random order, all concatenated and cut into equal rows."""
    stream = []
    for d in torch.randperm(len(documents), generator=generator).tolist():
        stream.extend(documents[d][0])
        for t in torch.randperm(len(documents[d]) - 1, generator=generator).tolist():
            stream.extend(documents[d][1 + t])
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)


def save_opt_checkpoint(model: OPTForCausalLM, config: OPTConfig, tokenizer, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(unpack_opt_weights(model, prefix=""), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    values = config.to_dict()
    values["architectures"] = ["OPTForCausalLM"]
    (out_dir / "config.json").write_text(json.dumps(values, indent=1) + "\n")
    tokenizer.save_pretrained(str(out_dir))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out_dir


def pretrain_lm(data: str, out_dir: str, steps: int = 1500, batch_size: int = 32, seq_len: int = 96,
                lr: float = 1e-3, hidden: int = 128, layers: int = 4, heads: int = 4, vocab_size: int = 512,
                seed: int = 0, bf16: bool = True, log=print) -> dict:
    torch.manual_seed(seed)
    documents = scene_documents(data)
    texts = [text for document in documents for text in document]
    tokenizer = build_opt_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    config = OPTConfig(hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       vocab_size=-(-len(tokenizer) // 16) * 16, max_position_embeddings=seq_len,
                       word_embed_proj_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dropout=0.0,
                       attention_dropout=0.0)
    model = OPTForCausalLM(config)
    init_bert_weights(model)
    ids = iter(tokenizer(texts).input_ids)
    token_lists = [[next(ids) + [tokenizer.eos_token_id] for _ in document] for document in documents]  # </s> text </s>
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.05)
    scheduler = build_scheduler(optimizer, warmup_steps=max(1, steps // 20), total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    rows, cursor, start = pack(token_lists, seq_len, generator), 0, time.perf_counter()
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for step in range(1, steps + 1):
        if cursor + batch_size > len(rows):
            rows, cursor = pack(token_lists, seq_len, generator), 0
        batch = rows[cursor:cursor + batch_size]
        cursor += batch_size
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = opt_logits(model, model.get_input_embeddings()(batch), mask)
        loss = lm_loss(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == steps:
            log(f"lm step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    save_opt_checkpoint(model.eval(), config, tokenizer, out_dir)
    return {"steps": steps, "final_loss": loss.item(), "seconds": time.perf_counter() - start,
            "vocab": len(tokenizer), "texts": len(texts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fovea.training.lm_pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="shapes JSONL: its captions and QA pairs are the corpus")
    parser.add_argument("--out", required=True, help="output OPTForCausalLM directory")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=96, help="packed sequence length = positions trained")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast (CPU or GPU); float32 master weights")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: small matrices gain little from more and lose a lot on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(pretrain_lm(args.data, args.out, args.steps, args.batch_size, args.seq_len, args.lr, args.hidden,
                                 args.layers, args.heads, args.vocab_size, args.seed, args.bf16)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
