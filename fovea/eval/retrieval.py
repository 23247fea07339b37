"""Image-text retrieval with a stage-1 model: recall@k both ways, by ITC alone and with the ITC top-k re-ranked
by ITM (BLIP-2's protocol: the cheap dual-encoder similarity picks candidates, the cross-attending matcher
orders them).

Image -> text: a query succeeds at k when any caption of the image is among the first k texts.
Text -> image: when the caption's own image is among the first k images. Chance is the expected recall of a
uniformly random ranking (`chance_recall_at_k`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fovea.eval.data import EvalImage
from fovea.eval.metrics import chance_recall_at_k, recall_at_k
from fovea.training.scoring import ImageTextScorer

KS = (1, 5, 10)


@dataclass(slots=True)
class RetrievalResult:
    num_images: int
    num_texts: int
    itc: dict[str, float]
    """"i2t_r1", ..., "t2i_r10" by ITC similarity alone."""
    reranked: dict[str, float]
    """The same after re-ranking each query's ITC top-k_rerank by ITM."""
    chance: dict[str, float]
    k_rerank: int

    def format(self) -> str:
        lines = [f"retrieval over {self.num_images} images and {self.num_texts} captions "
                 f"(ITM re-ranks the ITC top {self.k_rerank})",
                 f"{'':14}" + "".join(f"{name:>10}" for name in self.itc)]
        for label, values in (("ITC", self.itc), ("ITC+ITM", self.reranked), ("chance", self.chance)):
            lines.append(f"{label:14}" + "".join(f"{100 * v:9.1f}%" for v in values.values()))
        return "\n".join(lines)


def _rerank(itc: torch.Tensor, match_probability, k: int) -> list[list[int]]:
    """Per row: its ITC top-k columns ordered by match_probability(row, columns), then the rest by ITC."""
    rankings = []
    for row in range(itc.shape[0]):
        order = itc[row].argsort(descending=True).tolist()
        head = order[:k]
        probs = match_probability(row, head).tolist()
        head = [c for _, c in sorted(zip(probs, head), key=lambda pc: -pc[0])]
        rankings.append(head + order[k:])
    return rankings


def evaluate_retrieval(scorer: ImageTextScorer, items: list[EvalImage], k_rerank: int = 16) -> RetrievalResult:
    texts, text_image = [], []
    for index, item in enumerate(items):
        texts.extend(item.captions)
        text_image.extend([index] * len(item.captions))
    if not texts:
        raise ValueError("no captions to retrieve")
    images = scorer.embed_images([item.load() for item in items])
    text_embeddings = scorer.embed_texts(texts)
    itc = scorer.itc_scores(images, text_embeddings)  # (num_images, num_texts)
    image_relevant = [{t for t, i in enumerate(text_image) if i == index} for index in range(len(items))]
    text_relevant = [{i} for i in text_image]

    def image_query(row, columns):
        return scorer.itm_probs(images, text_embeddings, [(row, c) for c in columns])

    def text_query(row, columns):
        return scorer.itm_probs(images, text_embeddings, [(c, row) for c in columns])

    i2t_itc = itc.argsort(dim=1, descending=True).tolist()
    t2i_itc = itc.T.argsort(dim=1, descending=True).tolist()
    i2t_rerank = _rerank(itc, image_query, k_rerank)
    t2i_rerank = _rerank(itc.T, text_query, k_rerank)

    def table(i2t, t2i):
        out = {f"i2t_r{k}": recall_at_k(i2t, image_relevant, k) for k in KS}
        out.update({f"t2i_r{k}": recall_at_k(t2i, text_relevant, k) for k in KS})
        return out

    chance = {f"i2t_r{k}": chance_recall_at_k(len(texts), image_relevant, k) for k in KS}
    chance.update({f"t2i_r{k}": chance_recall_at_k(len(items), text_relevant, k) for k in KS})
    return RetrievalResult(num_images=len(items), num_texts=len(texts), itc=table(i2t_itc, t2i_itc),
                           reranked=table(i2t_rerank, t2i_rerank), chance=chance, k_rerank=k_rerank)
