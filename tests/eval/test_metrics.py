"""Caption, VQA and retrieval metrics on examples worked out by hand (the arithmetic is in the comments)."""
import math

import pytest

from fovea.eval.metrics import (bleu, caption_tokens, chance_recall_at_k, cider_d, exact_match, normalize_answer,
                                recall_at_k, vqa_accuracy)

LN2 = math.log(2)


def test_tokens_drop_case_and_punctuation():
    assert caption_tokens("A red circle, on a WHITE background.") == ["a", "red", "circle", "on", "a", "white",
                                                                        "background"]


def test_exact_match_after_normalising():
    assert exact_match(["A red circle.", "a blue square", "green"], [["a red circle"], ["x", "A Blue Square!"],
                                                                      ["red"]]) == pytest.approx(2 / 3)


def test_bleu4_one_sentence():
    # hyp "a red circle on a white background" vs ref "... black background": 7 tokens each
    # p1 = 6/7 (white misses), p2 = 4/6, p3 = 3/5, p4 = 2/4; equal lengths: BP = 1
    got = bleu(["a red circle on a white background"], [["a red circle on a black background"]])
    assert got == pytest.approx((6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25, rel=1e-12)


def test_bleu4_brevity_penalty_and_corpus_pooling():
    # "a red circle on a" (5 tokens) is all matches but short of the 7-token reference: BP = exp(1 - 7/5)
    short = (["a red circle on a"], [["a red circle on a black background"]])
    assert bleu(*short) == pytest.approx(math.exp(1 - 7 / 5), rel=1e-12)
    # pooled with the sentence above: p1 = (6+5)/(7+5), p2 = (4+4)/(6+4), p3 = (3+3)/(5+3), p4 = (2+2)/(4+2),
    # c = 12, r = 14
    got = bleu(["a red circle on a white background", "a red circle on a"],
               [["a red circle on a black background"], ["a red circle on a black background"]])
    expected = math.exp(1 - 14 / 12) * (11 / 12 * 8 / 10 * 6 / 8 * 4 / 6) ** 0.25
    assert got == pytest.approx(expected, rel=1e-12)


def test_bleu_clips_repeats_and_uses_the_closest_reference_length():
    # unigram only: "the" x4 against "the cat" counts once -> 1/4; c = 4 > r = 2 -> BP = 1
    assert bleu(["the the the the"], [["the cat"]], max_n=1) == pytest.approx(0.25)
    # closest reference to 5 tokens is the 3-token one (c = 5 > r = 3 -> BP = 1), not the 8-token one
    assert bleu(["a b c d e"], [["a b c", "a b c d e f g h"]], max_n=1) == pytest.approx(1.0)
    assert bleu(["x y"], [["a b"]]) == 0.0  # no matching n-gram at all


def test_cider_d_two_images():
    # I = 2 images; every reference n-gram occurs in one image: weight log 2 - log 1 = ln 2 per count.
    # Image A "red circle" == its reference: n=1 and n=2 cosine 1, n=3,4 empty -> 10/4 * 2 = 5.
    # Image B "blue circle" vs "blue square": n=1 cosine (ln2)^2 / (2 (ln2)^2) = 1/2, n=2 shares nothing
    # -> 10/4 * 1/2 = 1.25. Mean (5 + 1.25) / 2.
    refs = [["red circle"], ["blue square"]]
    assert cider_d(["red circle", "blue circle"], refs) == pytest.approx(3.125, rel=1e-12)


def test_cider_d_length_penalty_and_clipping():
    refs = [["red circle"], ["blue square"]]
    # "red circle big": n=1 cosine 2 (ln2)^2 / (sqrt3 ln2 * sqrt2 ln2) = 2/sqrt6, n=2 1/sqrt2, n=3 reference
    # empty; lengths 3 vs 2: penalty exp(-1/72). Image B's "zebra" shares nothing with its reference: 0.
    got = cider_d(["red circle big", "zebra"], refs)
    image_a = 10 / 4 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2))
    assert got == pytest.approx(image_a / 2, rel=1e-12)
    # "red red": min(2 ln2, ln2) * ln2 / (2 ln2 * sqrt2 ln2) = 1 / (2 sqrt2) at n=1, nothing at n=2
    assert cider_d(["red red", "zebra"], refs) == pytest.approx(10 / 4 / (2 * math.sqrt(2)) / 2, rel=1e-12)


def test_vqa_accuracy_single_and_ten_answers():
    assert normalize_answer("Two.") == "2" and normalize_answer("the top left") == "top left"
    assert vqa_accuracy(["two", "red", "yes"], [["2"], ["blue"], ["Yes"]]) == pytest.approx(2 / 3)
    humans = ["2"] * 2 + ["3"] * 8
    # "two": leaving out one of the two "2"s leaves 1 match (1/3), leaving out a "3" leaves 2 (2/3):
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy(["two"], [humans]) == pytest.approx(0.6)
    assert vqa_accuracy(["three"], [humans]) == pytest.approx(1.0)  # at least 3 others always agree
    assert vqa_accuracy(["four"], [humans]) == 0.0


def test_recall_and_its_chance_level():
    rankings = [[2, 0, 1], [1, 2, 0], [0, 1, 2]]
    relevant = [{0}, {0, 2}, {2}]
    assert recall_at_k(rankings, relevant, 1) == pytest.approx(0 / 3)
    assert recall_at_k(rankings, relevant, 2) == pytest.approx(2 / 3)
    assert recall_at_k(rankings, relevant, 3) == pytest.approx(1.0)
    # 1 of 4 relevant, k = 1: 1 - C(3,1)/C(4,1) = 1/4; 2 of 4, k = 2: 1 - C(2,2)/C(4,2) = 5/6
    assert chance_recall_at_k(4, [{0}], 1) == pytest.approx(0.25)
    assert chance_recall_at_k(4, [{0, 1}], 2) == pytest.approx(5 / 6)
    assert chance_recall_at_k(4, [{0}, {0, 1}], 2) == pytest.approx((0.5 + 5 / 6) / 2)
    assert chance_recall_at_k(3, [{0}], 10) == 1.0
