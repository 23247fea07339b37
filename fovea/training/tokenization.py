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

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

QFORMER_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
OPT_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]


def build_qformer_tokenizer(texts: Iterable[str], vocab_size: int = 512,
                            out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """WordPiece over lower-cased text split on whitespace and punctuation; deterministic for the same texts."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=QFORMER_SPECIAL_TOKENS,
                                        show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
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
    """Byte-level BPE (any text encodes); deterministic for the same texts."""
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
