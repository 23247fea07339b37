"""Structured outputs: what a constraint costs per decode step at batch 32, on the Qwen benchmark model's language
model (Qwen2-0.5B's dimensions, 151,936-token vocabulary, random weights), and the two grammar engines' mask cost.

The benchmark checkpoints' word-level tokenizer cannot spell JSON, so this one builds a byte-level BPE of the
same vocabulary size: the 256 byte symbols, every pair of printable ASCII characters, then triples until the
vocabulary is full (each with the merge that makes it), which gives the grammar engine a realistic token trie.

Part 1 (mask engines): per-step time to compute the allowed-token masks of 32 sequences following a JSON Schema,
llguidance (what fovea uses) vs xgrammar if installed, walking the same token sequences.
Part 2 (sampler): fovea's sampler step alone at batch 32 (greedy, bfloat16 logits) with 0, 1 and 32 rows
constrained: the constraint's whole per-step price, masks included (the unconstrained rows' share of it should
be nothing: with 1 constrained row, the step costs the 0-row step plus one row's mask and argmax).
Part 3 (end to end): fovea decode steps of 32 greedy requests on the Qwen benchmark model's language model, each
run of the same run timed alike: none constrained, 1 constrained (JSON Schema) beside 31 free, all 32
constrained; prints ms per step and the ratios. Needs the shared memory lock on a shared machine:

    flock /work/bigmem.lock python benchmarks/structured.py [--steps 48] [--dtype bfloat16] [--skip-e2e]

A smoke run of every part in about two minutes, without the lock (2 layers: 1.9 GB peak RSS). Its figures are not
the benchmark's: the 2-layer model's step is far shorter than the real one's, and a step's time is the whole
`generate` call's over the steps, so with few steps the prefill weighs in:

    python benchmarks/structured.py --steps 8 --num-layers 2
"""
from __future__ import annotations

import argparse
from importlib.metadata import version
import json
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 151936
BATCH = 32
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 200}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 50}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


def byte_level_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # printable ASCII as ByteLevel spells it (space is 'Ġ')
    printable = [c if c != " " else "Ġ" for c in string.printable[:95]]
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = []
    for a in printable:
        for b in printable:
            vocab.setdefault(a + b, len(vocab))
            merges.append((a, b))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for a in printable:
        for b in printable:
            for c in printable:
                if len(vocab) >= vocab_size - len(specials):
                    break
                vocab[a + b + c] = len(vocab)
                merges.append((a + b, c))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096)
    tokenizer.add_tokens(specials, special_tokens=True)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    return tokenizer


def walks(tokenizer, num: int) -> list[list[int]]:
    """Token sequences of valid JSON for SCHEMA, one per sequence, different lengths."""
    out = []
    for i in range(num):
        doc = {"name": "x" * (3 + i), "age": i * 7, "tags": [f"t{j}" for j in range(i % 5)]}
        out.append(tokenizer(json.dumps(doc, separators=(",", ":")), add_special_tokens=False).input_ids)
    return out


def mask_engines(tokenizer, steps: int) -> None:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    sequences = walks(tokenizer, BATCH)
    steps = min(steps, min(len(s) for s in sequences))
    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(BATCH)]
    setup = time.perf_counter() - t0
    executor = llguidance.LLExecutor()
    bitmask = llguidance.torch.allocate_token_bitmask(BATCH, VOCAB)
    t0 = time.perf_counter()
    for step in range(steps):
        llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        for m, seq in zip(matchers, sequences):
            assert m.consume_token(seq[step]), m.get_error()
    per_step = (time.perf_counter() - t0) / steps
    print(f"llguidance {version('llguidance')}: setup {setup:.2f} s, "
          f"masks of {BATCH} sequences + advance: {per_step * 1e3:.2f} ms/step")
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar: not installed")
        return
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                              separators=(",", ":"))
    xmatchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    setup = time.perf_counter() - t0
    xmask = xgr.allocate_token_bitmask(BATCH, VOCAB)
    t0 = time.perf_counter()
    for step in range(steps):
        for i, m in enumerate(xmatchers):
            m.fill_next_token_bitmask(xmask, i)
        for m, seq in zip(xmatchers, sequences):
            assert m.accept_token(seq[step])
    per_step = (time.perf_counter() - t0) / steps
    print(f"xgrammar {version('xgrammar')}: setup {setup:.2f} s, masks of {BATCH} sequences + advance: "
          f"{per_step * 1e3:.2f} ms/step")


def sampler_step(tokenizer, steps: int) -> None:
    """fovea's sampler alone on (32, 151936) logits: the whole per-step price of constraints (masks included)
    without the model's time around it; 0, 1 and 32 constrained rows, interleaved, best of 3 each."""
    from fovea.engine.structured_output import GrammarCompiler
    from fovea.sampling_params import SamplingParams, StructuredOutputsParams
    from fovea.worker.sampler import Sampler, SamplingMetadata, SamplingRow

    compiler = GrammarCompiler(tokenizer, VOCAB)
    so = StructuredOutputsParams(json=SCHEMA)
    sequences = walks(tokenizer, BATCH)
    steps = min(steps, min(len(s) for s in sequences))
    logits = torch.randn(BATCH, VOCAB, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    sampler = Sampler()
    greedy = SamplingParams(temperature=0.0)
    best = {}
    for _ in range(3):
        for num in (0, 1, BATCH):
            rows = [SamplingRow(greedy, [1], []) for _ in range(BATCH)]
            for i in range(num):
                rows[i].grammar = compiler.matcher(so)
            elapsed = 0.0
            for step in range(steps):
                t0 = time.perf_counter()
                sampler(logits, SamplingMetadata.build(rows, VOCAB))
                elapsed += time.perf_counter() - t0
                for i in range(num):  # advance along a valid document (outside the timed region: the runner's)
                    rows[i].grammar.consume_token(sequences[i][step])
            best[num] = min(best.get(num, float("inf")), elapsed / steps)
    for num, per_step in best.items():
        print(f"sampler, {num:2d} of {BATCH} rows constrained: {per_step * 1e3:6.2f} ms/step")


def end_to_end(tokenizer, steps: int, dtype: str, num_layers: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fovea import LLM, SamplingParams, StructuredOutputsParams

    with tempfile.TemporaryDirectory() as tmp:
        config = Qwen2Config(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=num_layers,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                             tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        llm = LLM(tmp, dtype=dtype, max_model_len=512, max_num_seqs=BATCH, num_kv_blocks=BATCH * 40 + 8)
        prompts = [f"request {i}: write the record" for i in range(BATCH)]
        free = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
        # at least 20 records: no row can finish (EOS) within the run, so every row runs all steps
        records = {"type": "array", "items": SCHEMA, "minItems": 20}
        constrained = SamplingParams(temperature=0.0, max_tokens=steps,
                                     structured_outputs=StructuredOutputsParams(json=records))
        runs = {"none": [free] * BATCH, "1 of 32": [constrained] + [free] * (BATCH - 1),
                "all 32": [constrained] * BATCH}
        llm.generate(prompts[:2], [constrained, free], use_tqdm=False)  # warm up, compile the grammar
        times = {}
        for name, params in list(runs.items()) * 2:  # twice, interleaved; the faster of each counts
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            times[name] = min(times.get(name, float("inf")), seconds / max(1, tokens / BATCH))
        base = times["none"]
        for name, per_step in times.items():
            print(f"constrained {name:7s}: {per_step * 1e3:7.1f} ms/step, {per_step / base:.3f}x unconstrained")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--num-layers", type=int, default=24, help="end to end: Qwen2-0.5B's 24, fewer for a smoke run")
    args = parser.parse_args()
    t0 = time.perf_counter()
    tokenizer = byte_level_tokenizer(VOCAB)
    print(f"tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - t0:.1f} s")
    mask_engines(tokenizer, args.steps)
    sampler_step(tokenizer, args.steps)
    if not args.skip_e2e:
        end_to_end(tokenizer, args.steps, args.dtype, args.num_layers)


if __name__ == "__main__":
    main()
