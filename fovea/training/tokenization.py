"""Small tokenizers trained here on a corpus (no downloads), in the two conventions BLIP-2 uses.

- `build_qformer_tokenizer`: BERT-style WordPiece for the Q-Former's text branch. Every encoding is
  `[CLS] ... [SEP]`; `[PAD]` is id 0 (the Q-Former config's pad_token_id); `[DEC]`, BLIP-2's decoder token
  that replaces `[CLS]` for ITG, is the tokenizer's `bos_token` (as LAVIS sets it).
- `build_opt_tokenizer`: OPT-style byte-level BPE for the language model: `<s>` 0, `<pad>` 1, `</s>` 2 (BOS and
  EOS), `<unk>` 3, and every encoding starts with `</s>`, as facebook/opt-* tokenizers do.

Both return a transformers `PreTrainedTokenizerFast`, which `save_pretrained` writes in the format
`AutoTokenizer` (and so fovea's engine and transformers) reads back.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

QFORMER_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
OPT_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]


def train_wordpiece_vocab(word_counts: Mapping[str, int], vocab_size: int, special_tokens: list[str],
                          prefix: str = "##") -> dict[str, int]:
    """A WordPiece vocabulary learned as `tokenizers`' `WordPieceTrainer` learns one (BPE merges over the words,
    a continuation piece written `##piece`), in an order fixed by the texts alone.

    Why not the trainer: it numbers the `##` pieces in hash-map order, which differs per process, and breaks
    count ties by those numbers, so the same texts gave another vocabulary on every run (huggingface/tokenizers
    #1794) and `make demo-model` another Q-Former input. Here: the special tokens, every character of the words
    alone and then as a continuation (both sorted, so any word of these characters encodes), then one merge at a
    time of the adjacent pair that occurs most often over all words (weighted by count; ties: the pair that sorts
    first), until `vocab_size` tokens or every word is one token."""
    vocab = dict.fromkeys(special_tokens)
    chars = sorted({c for word in word_counts for c in word})
    vocab.update(dict.fromkeys(chars))
    vocab.update(dict.fromkeys(prefix + c for c in chars))
    pieces = {word: [word[0], *(prefix + c for c in word[1:])] for word in word_counts if word}
    while len(vocab) < vocab_size:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, parts in pieces.items():
            for pair in zip(parts, parts[1:]):
                pair_counts[pair] += word_counts[word]
        if not pair_counts:
            break
        (left, right), _ = min(pair_counts.items(), key=lambda item: (-item[1], item[0]))
        merged = left + right[len(prefix):]
        vocab[merged] = None
        for parts in pieces.values():
            i = 0
            while i < len(parts) - 1:
                if parts[i] == left and parts[i + 1] == right:
                    parts[i:i + 2] = [merged]
                i += 1
    return {token: i for i, token in enumerate(vocab)}


def build_qformer_tokenizer(texts: Iterable[str], vocab_size: int = 512,
                            out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """WordPiece over lower-cased text split on whitespace and punctuation; the same vocabulary, ids and saved
    files for the same texts in every process (`train_wordpiece_vocab`)."""
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter[str] = Counter()
    for text, count in Counter(texts).items():  # each distinct text split once: the shapes texts repeat a lot
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            word_counts[word] += count
    vocab = train_wordpiece_vocab(word_counts, vocab_size, QFORMER_SPECIAL_TOKENS)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(QFORMER_SPECIAL_TOKENS)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]",
                                        model_max_length=512)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_opt_tokenizer(texts: Iterable[str], vocab_size: int = 512,
                        out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes); the same vocabulary, merges and saved files for the same texts in every
    process. `BpeTrainer` is deterministic here, unlike `WordPieceTrainer`: its alphabet (all 256 byte-level
    symbols, given as `initial_alphabet`) is sorted, and it breaks count ties by the pair's ids, which follow that
    order (tests/training/test_tokenization.py builds both in two processes and compares the files)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=OPT_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = "</s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=bos, pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=2048)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    """`python -m fovea.training.tokenization {qformer,opt} --texts FILE.jsonl --out DIR`: train a tokenizer on
    the captions (and questions and answers) of a shapes-style JSONL."""
    import argparse

    from fovea.training.lm_pretrain import shapes_texts

    parser = argparse.ArgumentParser(prog="python -m fovea.training.tokenization", description=main.__doc__)
    parser.add_argument("kind", choices=["qformer", "opt"])
    parser.add_argument("--texts", required=True, help="JSONL with 'caption' (and optional 'qa') per line")
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab-size", type=int, default=None, help="default: 256 (qformer), 512 (opt)")
    args = parser.parse_args(argv)
    texts = shapes_texts(args.texts)
    if args.kind == "qformer":
        tokenizer = build_qformer_tokenizer(texts, args.vocab_size or 256, args.out)
    else:
        tokenizer = build_opt_tokenizer(texts, args.vocab_size or 512, args.out)
    print(f"{args.kind} tokenizer with {len(tokenizer)} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
