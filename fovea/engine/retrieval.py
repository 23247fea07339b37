"""Stage-1 exports (`Blip2ForImageTextRetrieval`) behind `LLM.embed` and `LLM.score`.

Such a checkpoint has no language model, so it does not go through the generation engine: the scoring model
(`fovea.training.scoring.ImageTextScorer`, the same one `fovea eval retrieval` uses) runs every call in batches of
up to `max_num_seqs` inputs, in float32, in the calling process, also when tensor_parallel_size /
pipeline_parallel_size are given (what they would split is the language model; the ViT and Q-Former are replicated
under tensor parallelism and sit on the first stage of a pipeline, so a worker would run exactly this).

    embed, pooling "itc" (the only one):   an image -> (Q, E), one L2-normalised ITC embedding per query
                                           a text   -> (1, E), the [CLS] position's, L2-normalised
    score, method "itc":  max over the image's queries of the cosine similarity (transformers'
                          `logits_per_image` with use_image_text_matching_head=False)
    score, method "itm":  P(match), the softmax of the matching head's logits (use_image_text_matching_head=True)

Images are cached between calls (`EmbeddingCache`, sized by `encoder_cache_size` in rows, default
`max_num_batched_tokens` or 2048), keyed as `LLM.embed`'s cache is, by (stage, content hash), one stage per use:
"itc", the (Q, E) embedding that `embed` returns and ITC scores read, and "vision", the ViT's (P, Dv) output that
the matching head reads again with each text. So an image embedded once is not encoded again by a later ITC score
(or embed), nor one scored by ITM before by a later ITM score; a repeated image within a call runs once. Texts are
not cached (the Q-Former's text pass is short).

Texts are tokenised by the checkpoint's Q-Former tokenizer and padded to the longest text of the call (padding is
masked, so a text's result does not depend on its batch); a text over the Q-Former's position limit is refused,
never truncated.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fovea.config import EngineConfig
from fovea.engine.embedding_cache import EmbeddingCache, embed_through_cache
from fovea.training.scoring import ImageTextScorer

logger = logging.getLogger(__name__)

RETRIEVAL_ARCHITECTURE = "Blip2ForImageTextRetrieval"
RETRIEVAL_POOLING = ("itc",)
SCORE_METHODS = ("itc", "itm")
DEFAULT_CACHE_ROWS = 2048
"""Rows (encoder-output tokens) of images kept when neither encoder_cache_size nor max_num_batched_tokens is set."""


def is_retrieval_checkpoint(model: str | Path) -> bool:
    config = Path(model) / "config.json"
    if not config.is_file():
        return False
    return RETRIEVAL_ARCHITECTURE in (json.loads(config.read_text()).get("architectures") or [])


def _text_of(item: Any) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and not item.get("multi_modal_data") and isinstance(item.get("prompt"), str):
        return item["prompt"]
    return None


def _image_of(item: Any) -> Image.Image | None:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, dict) and not item.get("prompt"):
        images = (item.get("multi_modal_data") or {}).get("image")
        if isinstance(images, list) and len(images) == 1:
            images = images[0]
        if isinstance(images, Image.Image):
            return images
    return None


def _rows(items: Sequence[Any], key) -> dict[Any, int]:
    """key(item) -> its row among the distinct items, in first-seen order."""
    rows: dict[Any, int] = {}
    for item in items:
        rows.setdefault(key(item), len(rows))
    return rows


def _distinct(items: Sequence[Any], rows: dict[Any, int], key) -> list[Any]:
    out = [None] * len(rows)
    for item in items:
        out[rows[key(item)]] = item
    return out


class RetrievalRunner:
    def __init__(self, model: str | Path, max_batch: int, cache_rows: int = DEFAULT_CACHE_ROWS):
        self.scorer = ImageTextScorer.from_pretrained(model, batch_size=max_batch)
        self.tokenizer = self.scorer.tokenizer
        self.max_text_tokens = self.scorer.model.config.qformer_config.max_position_embeddings
        self.embedding_cache = EmbeddingCache(cache_rows)

    @classmethod
    def from_config(cls, config: EngineConfig) -> RetrievalRunner:
        num_ranks = config.tensor_parallel_size * config.pipeline_parallel_size
        if num_ranks > 1:
            # nothing here to split: tensor parallelism replicates the ViT and Q-Former on every rank, and a
            # pipeline puts them all on its first stage; so they run here, as that rank would run them
            logger.info("%s: tensor_parallel_size=%d x pipeline_parallel_size=%d has no language model to split; "
                        "the ViT and Q-Former run in this process", RETRIEVAL_ARCHITECTURE,
                        config.tensor_parallel_size, config.pipeline_parallel_size)
        return cls(config.model, config.max_num_seqs,
                   config.encoder_cache_size or config.max_num_batched_tokens or DEFAULT_CACHE_ROWS)

    # ---- inputs ------------------------------------------------------------------------------------------------

    def _check_texts(self, texts: Sequence[str], what: str) -> None:
        for i, text in enumerate(texts):
            num_tokens = len(self.tokenizer(text).input_ids)
            if num_tokens > self.max_text_tokens:
                raise ValueError(f"{what} {i}: the text is {num_tokens} tokens; this model reads at most "
                                 f"{self.max_text_tokens} (the Q-Former's max_position_embeddings)")

    def _texts(self, texts: Sequence[str]):
        self.scorer.max_text_len = max(len(self.tokenizer(t).input_ids) for t in texts)
        return self.scorer.embed_texts(texts)

    def _images(self, images: Sequence[Image.Image], stage: str) -> torch.Tensor:
        """(N, rows, dim) float32 of `stage` ("itc" or "vision", see the module docstring) per image: cached ones
        from the cache, the distinct others run through the ViT (and the Q-Former) in batches, then kept."""
        def run(missing: list[Image.Image]) -> list[torch.Tensor]:
            embeddings = self.scorer.embed_images(missing)
            return (embeddings.features if stage == "itc" else embeddings.vision).float().unbind(0)

        return torch.stack(embed_through_cache(self.embedding_cache, stage, images, run))

    # ---- embed / score -----------------------------------------------------------------------------------------

    def embed(self, inputs: Sequence[Any], pooling: str | None) -> list[torch.Tensor]:
        """One float32 embedding per input, images (Q, E) and texts (1, E) in any mix, in input order."""
        pooling = "itc" if pooling is None else pooling
        if pooling not in RETRIEVAL_POOLING:
            raise ValueError(f"unknown pooling {pooling!r}; this model ({RETRIEVAL_ARCHITECTURE}) offers "
                             f"{', '.join(RETRIEVAL_POOLING)}")
        image_at, text_at = {}, {}
        for i, item in enumerate(inputs):
            if (image := _image_of(item)) is not None:
                image_at[i] = image
            elif (text := _text_of(item)) is not None:
                text_at[i] = text
            else:
                raise ValueError(f"input {i}: give a text (a string or {{'prompt': text}}) or one image (a PIL "
                                 f"image or {{'multi_modal_data': {{'image': image}}}}), not both")
        self._check_texts(list(text_at.values()), "input")
        out: dict[int, torch.Tensor] = {}
        if image_at:
            features = self._images(list(image_at.values()), "itc")  # (N, Q, E)
            out.update(zip(image_at, features.unbind(0)))
        if text_at:
            features = self._texts(list(text_at.values())).features  # (M, E)
            out.update(zip(text_at, features.unsqueeze(1).unbind(0)))
        return [out[i].float() for i in range(len(inputs))]

    def score(self, images: Sequence[Image.Image], texts: Sequence[str], method: str) -> list[float]:
        """Pairs (images[k], texts[k]); the caller has broadcast one-to-many already."""
        if method not in SCORE_METHODS:
            raise ValueError(f"unknown score method {method!r}; choose one of {', '.join(SCORE_METHODS)}")
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"image {i}: expected a PIL image, got {type(image).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text {i}: expected a string, got {type(text).__name__}")
        self._check_texts(texts, "text")
        if not images:
            return []
        # one-to-many calls repeat the same image (or text): embed each distinct one once
        image_row = _rows(images, key=id)
        text_row = _rows(texts, key=lambda text: text)
        distinct_images = _distinct(images, image_row, key=id)
        text_emb = self._texts(_distinct(texts, text_row, key=lambda text: text))
        pairs = torch.tensor([(image_row[id(image)], text_row[text]) for image, text in zip(images, texts)])
        if method == "itm":
            return self.scorer.itm_probs(self._images(distinct_images, "vision"), text_emb, pairs).tolist()
        i, j = pairs.unbind(1)
        # (K, Q) cosine of each pair's image queries with its text; the best query scores
        features = self._images(distinct_images, "itc")
        return torch.einsum("kqe,ke->kq", features[i], text_emb.features[j]).amax(dim=-1).tolist()
