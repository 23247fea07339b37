"""Caption, VQA and retrieval metrics in plain Python (no torch), each defined in its docstring.

Captions are compared after `caption_tokens`: lower case, punctuation dropped, split on whitespace (what the
COCO caption toolkit's PTB tokenisation does to ordinary English). Scores are corpus-level: BLEU-4 pools
n-gram counts over all captions, CIDEr-D averages per-image scores whose IDF comes from all references.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = re.compile(r"[^\w\s]")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}


def caption_tokens(text: str) -> list[str]:
    return _PUNCTUATION.sub(" ", text.lower()).split()


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


# ---------------------------------------------------------------- exact match


def normalize_caption(text: str) -> str:
    return " ".join(caption_tokens(text))


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal to one of their references after `normalize_caption`."""
    _check_lengths(predictions, references)
    hits = sum(normalize_caption(p) in {normalize_caption(r) for r in refs} for p, refs in zip(predictions, references))
    return hits / len(predictions)


# ---------------------------------------------------------------- BLEU-4


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) up to `max_n`-grams, uniform weights.

    p_n = (sum over captions of n-gram matches, each n-gram counted at most as often as in the reference that
    has it most) / (sum over captions of the caption's n-grams). With c the total predicted length and r the
    sum over captions of the reference length closest to the caption's (the shorter on a tie),
    BP = 1 if c > r else exp(1 - r / c), and BLEU = BP * exp(mean_n log p_n); 0 if some p_n is 0.
    """
    _check_lengths(predictions, references)
    matches, totals = [0] * max_n, [0] * max_n
    predicted_length = reference_length = 0
    for prediction, refs in zip(predictions, references):
        hyp = caption_tokens(prediction)
        ref_tokens = [caption_tokens(r) for r in refs]
        predicted_length += len(hyp)
        reference_length += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            counts = ngrams(hyp, n)
            most = Counter()
            for r in ref_tokens:
                most |= ngrams(r, n)  # per n-gram, the largest count in any one reference
            matches[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            totals[n - 1] += sum(counts.values())
    if predicted_length == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if predicted_length > reference_length else math.exp(1 - reference_length / predicted_length)
    return brevity * math.exp(log_precision)


# ---------------------------------------------------------------- CIDEr-D


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
            sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015), on the 0..10 scale the COCO toolkit reports.

    For each n, a sentence is a vector over n-grams: g(w) = count(w) * (log I - log max(1, df(w))), where I
    is the number of images and df(w) the number of images whose references contain w. Image i scores

        CIDEr-D_i = 10 / (N * |R_i|) * sum_n sum_{r in R_i} exp(-(len(c) - len(r))^2 / (2 sigma^2))
                    * sum_w min(g_c(w), g_r(w)) * g_r(w) / (|g_c| |g_r|)

    (N = max_n; the min clips n-grams repeated more than the reference has them; a zero vector scores 0),
    and the corpus score is the mean over images.
    """
    _check_lengths(predictions, references)
    num_images = len(predictions)
    ref_tokens = [[caption_tokens(r) for r in refs] for refs in references]
    document_frequency: Counter = Counter()
    for refs in ref_tokens:
        seen = set()
        for r in refs:
            for n in range(1, max_n + 1):
                seen.update(ngrams(r, n))
        document_frequency.update(seen)
    log_images = math.log(num_images)

    def vectors(tokens: list[str]) -> list[dict[tuple, float]]:
        return [{g: c * (log_images - math.log(max(1.0, document_frequency[g]))) for g, c in ngrams(tokens, n).items()}
                for n in range(1, max_n + 1)]

    def norm(vector: dict[tuple, float]) -> float:
        return math.sqrt(sum(v * v for v in vector.values()))

    total = 0.0
    for prediction, refs in zip(predictions, ref_tokens):
        hyp = caption_tokens(prediction)
        hyp_vectors = vectors(hyp)
        image_score = 0.0
        for r in refs:
            penalty = math.exp(-((len(hyp) - len(r)) ** 2) / (2 * sigma**2))
            for hv, rv in zip(hyp_vectors, vectors(r)):
                denominator = norm(hv) * norm(rv)
                if denominator > 0:
                    image_score += penalty * sum(min(v, rv.get(g, 0.0)) * rv.get(g, 0.0)
                                                 for g, v in hv.items()) / denominator
        total += 10.0 * image_score / (max_n * len(refs))
    return total / num_images


# ---------------------------------------------------------------- VQA accuracy


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles dropped, number words as digits ("Two." -> "2")."""
    words = [NUMBER_WORDS.get(w, w) for w in caption_tokens(text) if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy after `normalize_answer`.

    With one reference answer a prediction scores 1 if it equals it, else 0. With k > 1 human answers (VQA v2
    has 10) it scores the VQA metric: the mean over the k ways of leaving one answer out of
    min(1, (answers among the other k - 1 equal to the prediction) / 3).
    """
    _check_lengths(predictions, answers)
    total = 0.0
    for prediction, refs in zip(predictions, answers):
        guess = normalize_answer(prediction)
        same = [normalize_answer(a) == guess for a in refs]
        if len(refs) == 1:
            total += float(same[0])
        else:
            total += sum(min(1.0, (sum(same) - s) / 3) for s in same) / len(refs)
    return total / len(predictions)


# ---------------------------------------------------------------- retrieval


def recall_at_k(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]], k: int) -> float:
    """Fraction of queries with a relevant item among the first k of their ranking."""
    _check_lengths(rankings, relevant)
    return sum(bool(set(ranking[:k]) & rel) for ranking, rel in zip(rankings, relevant)) / len(rankings)


def chance_recall_at_k(num_items: int, relevant: Sequence[set[int]], k: int) -> float:
    """Expected recall@k of a uniformly random ranking of `num_items`: per query with m relevant items,
    1 - C(num_items - m, k) / C(num_items, k)."""
    k = min(k, num_items)
    return sum(1 - math.comb(num_items - len(rel), k) / math.comb(num_items, k) for rel in relevant) / len(relevant)


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"need as many references as predictions, at least one: got {len(a)} and {len(b)}")
