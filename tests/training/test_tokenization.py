"""The demo model's tokenizers (`fovea.training.tokenization`) are the same for the same texts in every process:
built by the real command in two fresh processes (hash seeds differ; `tokenizers`' own hash maps are seeded per
process anyway) and the saved files compared byte for byte. `WordPieceTrainer` failed this (huggingface/tokenizers
#1794), so `make demo-model` gave another Q-Former tokenizer on every run; the WordPiece vocabulary is now
learned by `train_wordpiece_vocab`, checked here merge by merge on a hand-sized corpus."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fovea.training.tokenization import QFORMER_SPECIAL_TOKENS, build_qformer_tokenizer, train_wordpiece_vocab

ROOT = Path(__file__).resolve().parents[2]

# many words of equal count, so a merge order that depended on anything but the texts would show
TEXTS = [f"{n} {size} {colour} {shape}s on a {bg} background. Question: what colour is the {shape}? Answer: {colour}"
         for n, size, colour, shape, bg in [
             ("two", "small", "red", "circle", "white"), ("one", "large", "blue", "square", "black"),
             ("three", "small", "green", "triangle", "grey"), ("two", "large", "yellow", "diamond", "orange"),
             ("one", "small", "purple", "cross", "white"), ("three", "large", "cyan", "star", "pink")]]

_BUILD = """
import sys
from fovea.training.tokenization import build_opt_tokenizer, build_qformer_tokenizer
texts = sys.stdin.read().splitlines()
build_qformer_tokenizer(texts, 120, sys.argv[1] + "/qformer")
build_opt_tokenizer(texts, 320, sys.argv[1] + "/opt")
"""


def _build(out: Path, hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", _BUILD, str(out)], input="\n".join(TEXTS), text=True, env=env,
                   check=True, capture_output=True, cwd=ROOT)


def test_the_same_texts_give_the_same_files_in_every_process(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _build(first, "1")
    _build(second, "2")
    for kind, vocab_size in [("qformer", 120), ("opt", 320)]:  # opt: 260 byte-level symbols and specials, then merges
        names = sorted(p.name for p in (first / kind).iterdir())
        assert names == sorted(p.name for p in (second / kind).iterdir()) and "tokenizer.json" in names
        for name in names:
            assert (first / kind / name).read_bytes() == (second / kind / name).read_bytes(), f"{kind}: {name} differs"
        vocab = json.loads((first / kind / "tokenizer.json").read_text())["model"]["vocab"]
        assert len(vocab) == vocab_size  # merges were learned (not just the alphabet), so their order was tested


def test_wordpiece_merges_most_frequent_pair_first_ties_by_the_pairs_strings():
    # abab: a ##b ##a ##b (x2), ab: a ##b, ba: b ##a
    # pairs: (a, ##b) 3 -> "ab"; then (##a, ##b) 2 ties (ab, ##a) 2: "##a" sorts first -> "##ab";
    # then (ab, ##ab) 2 -> "abab"; then (b, ##a) 1 -> "ba"; then every word is one token
    vocab = train_wordpiece_vocab({"abab": 2, "ab": 1, "ba": 1}, 100, ["[PAD]", "[UNK]"])
    assert list(vocab) == ["[PAD]", "[UNK]", "a", "b", "##a", "##b", "ab", "##ab", "abab", "ba"]
    assert list(vocab.values()) == list(range(10))
    assert list(train_wordpiece_vocab({"abab": 2, "ab": 1, "ba": 1}, 8, ["[PAD]", "[UNK]"])) == \
        ["[PAD]", "[UNK]", "a", "b", "##a", "##b", "ab", "##ab"]
    # the order the words come in changes nothing
    assert train_wordpiece_vocab({"ba": 1, "ab": 1, "abab": 2}, 100, ["[PAD]", "[UNK]"]) == vocab


def test_qformer_tokenizer_encodes_with_the_learned_pieces():
    tok = build_qformer_tokenizer(["abab ab ba", "abab, AB!"], vocab_size=100)
    assert tok.convert_ids_to_tokens(list(range(len(QFORMER_SPECIAL_TOKENS)))) == QFORMER_SPECIAL_TOKENS
    assert tok.tokenize("ABAB ba abba") == ["abab", "ba", "ab", "##b", "##a"]  # lower-cased, longest piece first
    assert tok("ab").input_ids == [tok.cls_token_id, tok.convert_tokens_to_ids("ab"), tok.sep_token_id]
    assert tok.tokenize("[DEC] ab") == ["[DEC]", "ab"]  # a special token in the text stays whole
    assert tok.tokenize("zz") == ["[UNK]"]  # characters never seen: unknown, not dropped
