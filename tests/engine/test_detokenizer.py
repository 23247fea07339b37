from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fovea.engine.detokenizer import IncrementalDetokenizer
from fovea.sampling_params import SamplingParams

FFFD = "\ufffd"

# Multi-byte text on purpose: accents (2 bytes), CJK and Hangul (3), emoji (4, some with modifiers and ZWJ).
CORPUS = """The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a mat near the window.
Café crème brûlée, naïve façade, jalapeño piñata, déjà vu, Ærøskøbing, Straße, œuvre.
日本語のテキストと中文文本，还有한국어 문장도 있습니다. 東京の天気は晴れです。
Emoji: 😀 🎉 👍🏽 🇫🇷 ❤️ 👩‍💻 🐱 and symbols ∑ ∫ √ π ≈ 3.14 € £ ¥.
Привет, мир! Ελληνικά γράμματα. Question: what is in the image? Answer: two dogs on the grass.
"""

TEXTS = [
    "A photo of a cat 🐱 sitting on a mat. Café déjà vu!",
    "日本語のテキスト 😀🎉 and 中文文本，한국어 문장.",
    "👩‍💻👍🏽🇫🇷❤️ ∑√π≈ Ærøskøbing Straße œuvre",
    "Question: what is in the image? Answer: two dogs 🐶 on the grass.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=450, special_tokens=["<pad>", "</s>", "<unk>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = CORPUS.splitlines()
    tok.train_from_iterator(lines * 3 + CORPUS.split(), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                 extra_special_tokens=["<image>"])
    hf.add_tokens(["<note>"])  # an added token that is not special: kept even with skip_special_tokens
    return hf


def _run(tokenizer, ids, prompt_ids=(), chunk_sizes=(1,), rng=None, finish=True, **params):
    """Feed `ids` in chunks; returns (detokenizer, the text each update added, stop string)."""
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(**params), list(prompt_ids))
    deltas, stop, i = [], None, 0
    while i < len(ids) and stop is None:
        size = rng.choice(chunk_sizes) if rng else chunk_sizes[0]
        chunk = ids[i:i + size]
        i += size
        before = detok.output_text
        stop = detok.update(chunk, finished=finish and i >= len(ids))
        if stop is None:
            assert detok.output_text.startswith(before)  # emitted text is never taken back but by a stop string
        deltas.append(detok.output_text[len(before):])
    return detok, deltas, stop


def test_text_round_trip_token_by_token(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert any(FFFD in tokenizer.decode([t]) for t in ids), "the corpus must split characters across tokens"
        detok, deltas, _ = _run(tokenizer, ids, prompt_ids=tokenizer.encode("Describe: "))
        assert detok.output_text == text == tokenizer.decode(ids)
        assert "".join(deltas) == text
        assert not any(FFFD in d for d in deltas)
        assert detok.output_token_ids == ids and detok.is_finished


def test_only_a_short_window_is_decoded(tokenizer, monkeypatch):
    ids = tokenizer.encode(" ".join(TEXTS) * 3)
    lengths = []
    decode = type(tokenizer).decode

    def spy(self, token_ids, **kwargs):
        lengths.append(len(token_ids))
        return decode(self, token_ids, **kwargs)

    monkeypatch.setattr(type(tokenizer), "decode", spy)
    detok, _, _ = _run(tokenizer, ids, prompt_ids=[5, 6, 7, 8, 9, 10, 11])
    monkeypatch.undo()
    assert detok.output_text == tokenizer.decode(ids)
    assert len(ids) > 200 and max(lengths) <= 10


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_equal_full_decode(tokenizer, skip_special_tokens):
    """Random ids, special and added tokens among them, give invalid UTF-8 too; the text still equals one
    decode of all ids, less a character cut off at the very end."""
    rng = random.Random(0)
    vocab = len(tokenizer)
    byte_ids = [tokenizer.convert_tokens_to_ids(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    specials = tokenizer.all_special_ids + [tokenizer.convert_tokens_to_ids("<note>")]
    for trial in range(150):
        pool = [rng.randrange(vocab) for _ in range(30)] + rng.sample(byte_ids, 20) + specials
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        detok, deltas, _ = _run(tokenizer, ids, prompt, chunk_sizes=(1, 1, 2, 3), rng=rng,
                                skip_special_tokens=skip_special_tokens)
        full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert detok.output_text == full.rstrip(FFFD), (trial, ids)
        assert "".join(deltas) == detok.output_text


def test_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("a cat <image> on <note> a mat</s>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a cat  on <note> a mat"
    for skip in (True, False):
        detok, _, _ = _run(tokenizer, ids, skip_special_tokens=skip)
        assert detok.output_text == tokenizer.decode(ids, skip_special_tokens=skip)


def test_a_character_cut_at_the_end_is_dropped(tokenizer):
    ids = tokenizer.encode("ok 🎉")
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith(FFFD))
    detok, deltas, _ = _run(tokenizer, ids[:cut])
    assert detok.output_text == tokenizer.decode(ids[:cut]).rstrip(FFFD) == "ok "
    assert "".join(deltas) == "ok "


# ---------------------------------------------------------------- stop strings


def _boundary_stop(tokenizer, ids):
    """A stop string made of the last 2 characters of one token and the first 2 of the next."""
    pieces = [tokenizer.decode([t]) for t in ids]
    for j in range(len(pieces) - 1):
        a, b = pieces[j], pieces[j + 1]
        if len(a) >= 2 and len(b) >= 2 and FFFD not in a + b:
            return j, a[-2:] + b[:2]
    raise AssertionError("no suitable boundary")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundary(tokenizer, include):
    text = "Question: what is in the image? Answer: two dogs on the grass. The quick brown fox"
    ids = tokenizer.encode(text)
    j, stop = _boundary_stop(tokenizer, ids[5:])
    j += 5
    assert stop not in tokenizer.decode(ids[: j + 1]) and stop in tokenizer.decode(ids[: j + 2])
    detok, _, matched = _run(tokenizer, ids, stop=["never there", stop], include_stop_str_in_output=include)
    assert matched == stop and detok.stop_string == stop and detok.is_finished
    assert len(detok.output_token_ids) == j + 2  # found on the token that completed it
    cut = text.index(stop) + (len(stop) if include else 0)
    assert detok.output_text == text[:cut]


def test_stop_string_in_multibyte_text_and_earliest_wins(tokenizer):
    text = "日本語のテキスト 😀🎉 and 中文文本，한국어 문장."
    ids = tokenizer.encode(text)
    detok, _, matched = _run(tokenizer, ids, stop=["한국", "😀🎉", "文本"], chunk_sizes=(len(ids),))
    assert matched == "😀🎉" and detok.output_text == "日本語のテキスト "


def test_min_tokens_delays_stop_strings(tokenizer):
    text = "cat dog cat dog cat"
    ids = tokenizer.encode(text)
    first_dog = next(n for n in range(1, len(ids) + 1) if "dog" in tokenizer.decode(ids[:n]))
    detok, _, matched = _run(tokenizer, ids, stop=["dog"], min_tokens=first_dog, max_tokens=50)
    assert matched == "dog" and detok.output_text == "cat dog cat "


def test_stop_token_text_is_left_out_unless_included(tokenizer):
    ids = tokenizer.encode("a cat on a mat")
    stop_id = ids[-1]  # an ordinary token used as a stop token id
    for include, expected in ((False, tokenizer.decode(ids[:-1])), (True, tokenizer.decode(ids))):
        detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop_token_ids=[stop_id],
                                                                 include_stop_str_in_output=include), [])
        detok.update(ids[:-2])
        assert detok.update(ids[-2:], stop_terminated=True) is None
        assert detok.output_text == expected and detok.output_token_ids == ids and detok.is_finished
    eos = tokenizer.eos_token_id
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=False), [])
    detok.update(ids + [eos], stop_terminated=True)
    assert detok.output_text == "a cat on a mat"  # EOS text stays out even when specials are shown


def test_update_after_finish_is_an_error(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(), [])
    detok.update(tokenizer.encode("hi"), finished=True)
    with pytest.raises(RuntimeError):
        detok.update([5])
