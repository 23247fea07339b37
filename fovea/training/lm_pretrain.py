"""Pre-train a small OPT language model on text, to be frozen under stage 2.

BLIP-2 reads images into a frozen LLM that already knows the language and already answers from what it is
shown. For the demo that language is the shapes captions and question/answer pairs, and "what it is shown" is
a *scene context*: a fixed-length run of `context_len` tokens at the very start of the sequence, exactly where
stage 2 puts the image's query tokens, holding the scene's caption and where each single shape sits, e.g.

    "two small red circles and one large blue square on a white background , square top left"  + <pad>...

Each training row is one scene: its context, then its caption (mostly; see SKIP_CAPTION) and every
"Question: q Answer: a" about it in a random order, each as the LLM sees texts in stage 2 (`</s>` + text +
`</s>`), with the loss on the texts only.
The model so learns to read every answer and the caption off the context (copying, and adding two counts for
"how many shapes"), wherever the text comes; stage 2 then only has to teach the Q-Former to write a context the
frozen model reads. (A model trained on texts alone, with nothing before `</s>` to read, learns that the prefix
is noise, and a frozen one then never uses the image: the demo's first attempt reached chance-level VQA.)

The result is an `OPTForCausalLM` directory (transformers' names, q/k/v separate) with its tokenizer, which
already holds the `<image>` placeholder stage 2 needs.

    python -m fovea.training.lm_pretrain --data shapes/train.jsonl --out runs/opt --steps 3000 --context-len 24
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
from fovea.training.losses import IGNORE_INDEX, lm_loss
from fovea.training.optim import build_optimizer, build_scheduler
from fovea.training.shapes import POSITIONS
from fovea.training.stage1 import init_bert_weights
from fovea.training.tokenization import build_opt_tokenizer

IMAGE_TOKEN = "<image>"
VQA_PROMPT = "Question: {} Answer:"
SKIP_CAPTION = 0.25
"""How often a training row goes straight from the context to the questions. Mostly the caption comes first, so
that after the context and `</s>` the model's first choice is the caption (what an empty prompt asks for); the
other rows teach it to answer a question asked right after the context, as stage 2 and VQA prompts do."""


def scene_context(record: dict) -> str:
    """The caption, then ", {shape} {position}" for every shape that is alone of its kind (the only shapes
    "where is the ...?" asks about)."""
    objects = record["scene"]["objects"]
    kinds = [obj["shape"] for obj in objects]
    places = [f" , {obj['shape']} {POSITIONS[obj['cell']]}" for obj in objects if kinds.count(obj["shape"]) == 1]
    return record["caption"] + "".join(places)


def scene_documents(path: str | Path, vqa_prompt: str = VQA_PROMPT) -> list[list[str]]:
    """Per record of a shapes JSONL: its scene context, its caption and every "Question: q Answer: a" about it."""
    documents = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        documents.append([scene_context(record), record["caption"]]
                         + [f"{vqa_prompt.format(qa['question'])} {qa['answer']}" for qa in record.get("qa", [])])
    return documents


def shapes_texts(path: str | Path, vqa_prompt: str = VQA_PROMPT) -> list[str]:
    """Every caption and every "Question: q Answer: a" of a shapes JSONL (scene contexts left out)."""
    return [text for document in scene_documents(path, vqa_prompt) for text in document[1:]]


def encode_documents(tokenizer, documents: list[list[str]], context_len: int) -> list[tuple[list[int], list[list[int]]]]:
    """Per document: its context's ids (no BOS) right-padded with `<pad>` to context_len, and each text's
    `</s> text </s>` ids."""
    contexts = tokenizer([d[0] for d in documents], add_special_tokens=False).input_ids
    longest = max(len(c) for c in contexts)
    if longest > context_len:
        raise ValueError(f"a scene context takes {longest} tokens, more than context_len={context_len}; raise "
                         f"context_len (it must equal the Q-Former's num_query_tokens)")
    ids = iter(tokenizer([t for d in documents for t in d[1:]]).input_ids)
    return [(c + [tokenizer.pad_token_id] * (context_len - len(c)), [next(ids) + [tokenizer.eos_token_id]
                                                                   for _ in d[1:]])
            for c, d in zip(contexts, documents)]


def scene_rows(encoded: list[tuple[list[int], list[list[int]]]], indices: list[int], seq_len: int,
               pad_id: int, generator: torch.Generator, skip_caption: float = SKIP_CAPTION
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, labels), each (len(indices), seq_len): per scene its context, its caption (left out
    with probability skip_caption), then its questions in a random order, cut at seq_len; labels IGNORE_INDEX
    on the context and on padding."""
    ids = torch.full((len(indices), seq_len), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    skips = (torch.rand(len(indices), generator=generator) < skip_caption).tolist()
    for row, index in enumerate(indices):
        context, (caption, *questions) = encoded[index]
        order = torch.randperm(len(questions), generator=generator).tolist()
        stream = ([] if skips[row] else caption) + [t for i in order for t in questions[i]]
        stream = stream[: seq_len - len(context)]
        n = len(context) + len(stream)
        ids[row, :n] = torch.tensor(context + stream)
        labels[row, len(context):n] = torch.tensor(stream)
        mask[row, :n] = 1
    return ids, mask, labels


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


def pretrain_lm(data: str, out_dir: str, steps: int = 3000, batch_size: int = 32, seq_len: int = 96,
                lr: float = 1e-3, hidden: int = 128, layers: int = 4, heads: int = 4, vocab_size: int = 512,
                seed: int = 0, bf16: bool = True, context_len: int = 24, val_data: str | None = None,
                log=print) -> dict:
    torch.manual_seed(seed)
    documents = scene_documents(data)
    tokenizer = build_opt_tokenizer([t for d in documents for t in d], vocab_size=vocab_size)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if seq_len <= context_len:
        raise ValueError(f"seq_len={seq_len} must exceed context_len={context_len}")
    config = OPTConfig(hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       vocab_size=-(-len(tokenizer) // 16) * 16, max_position_embeddings=seq_len,
                       word_embed_proj_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dropout=0.0,
                       attention_dropout=0.0)
    model = OPTForCausalLM(config)
    init_bert_weights(model)
    encoded = encode_documents(tokenizer, documents, context_len)
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.05)
    scheduler = build_scheduler(optimizer, warmup_steps=max(1, steps // 20), total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    order, cursor, start = torch.randperm(len(encoded), generator=generator).tolist(), 0, time.perf_counter()
    for step in range(1, steps + 1):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(encoded), generator=generator).tolist(), 0
        ids, mask, labels = scene_rows(encoded, order[cursor:cursor + batch_size], seq_len, tokenizer.pad_token_id,
                                       generator)
        cursor += batch_size
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = opt_logits(model, model.get_input_embeddings()(ids), mask)
        loss = lm_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == steps:
            log(f"lm step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    result = {"steps": steps, "final_loss": loss.item(), "seconds": time.perf_counter() - start,
              "vocab": len(tokenizer), "texts": sum(len(d) - 1 for d in documents)}
    if val_data:
        result["context_reading"] = context_reading(model, tokenizer, val_data, context_len)
        log(f"reading the true scene context (val): {json.dumps(result['context_reading'])}")
    save_opt_checkpoint(model, config, tokenizer, out_dir)
    return result


@torch.no_grad()
def context_reading(model: OPTForCausalLM, tokenizer, data: str | Path, context_len: int,
                    max_scenes: int = 200, max_new_tokens: int = 24) -> dict:
    """How well the model answers from the *true* scene context (the best a perfect Q-Former can reach):
    caption exact match and VQA accuracy by greedy decoding, over the first max_scenes scenes of `data`."""
    records = [json.loads(line) for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = records[:max_scenes]
    documents = [[scene_context(r), r["caption"]] for r in records]
    contexts = [c for c, _ in encode_documents(tokenizer, documents, context_len)]
    jobs = [(i, "", r["caption"]) for i, r in enumerate(records)]
    jobs += [(i, VQA_PROMPT.format(qa["question"]), qa["answer"]) for i, r in enumerate(records) for qa in r["qa"]]
    correct = {"caption": [0, 0], "vqa": [0, 0]}
    for i, prompt, answer in jobs:
        ids = contexts[i] + tokenizer(prompt).input_ids
        generated = []
        for _ in range(min(max_new_tokens, model.config.max_position_embeddings - len(ids))):
            x = torch.tensor([ids + generated])
            next_id = int(opt_logits(model, model.get_input_embeddings()(x), torch.ones_like(x))[0, -1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            generated.append(next_id)
        kind = "vqa" if prompt else "caption"
        correct[kind][0] += tokenizer.decode(generated).strip() == answer
        correct[kind][1] += 1
    return {"caption_exact_match": correct["caption"][0] / correct["caption"][1],
            "vqa_accuracy": correct["vqa"][0] / correct["vqa"][1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fovea.training.lm_pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="shapes JSONL: its captions and QA pairs are the corpus")
    parser.add_argument("--val-data", default=None, help="shapes JSONL to report context reading on at the end")
    parser.add_argument("--out", required=True, help="output OPTForCausalLM directory")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=96, help="row length = positions trained")
    parser.add_argument("--context-len", type=int, default=24,
                        help="scene-context tokens at the start of each row: the Q-Former's num_query_tokens")
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
                                 args.layers, args.heads, args.vocab_size, args.seed, args.bf16, args.context_len,
                                 args.val_data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
