"""Use a stage-1 model from Python: embed images and texts, score pairs by ITC similarity and ITM probability.

    scorer = ImageTextScorer.from_pretrained("runs/stage1/export")      # or a training checkpoint folder
    images = scorer.embed_images([Image.open("a.png"), Image.open("b.png")])
    texts = scorer.embed_texts(["two red circles", "a blue square"])
    scorer.itc_scores(images, texts)                 # (2, 2) cosine similarity, best query per image
    scorer.itm_probs(images, texts, [(0, 0), (1, 0)]) # (2,) P(match) for the pairs (image i, text j)

The scores are transformers' `Blip2ForImageTextRetrieval` outputs on the same checkpoint: ITC is its
`logits_per_image` (use_image_text_matching_head=False), ITM the softmax of its matching logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoTokenizer

from fovea.models.weights import load_weights
from fovea.multimodal.processors import BlipImageProcessor
from fovea.training.stage1 import Stage1Model


@dataclass(slots=True)
class ImageEmbeddings:
    vision: torch.Tensor
    """(N, P, Dv) the frozen ViT's output, which ITM reads again with each text."""
    features: torch.Tensor
    """(N, Q, E) L2-normalised ITC embeddings, one per query."""


@dataclass(slots=True)
class TextEmbeddings:
    input_ids: torch.Tensor
    """(M, T) Q-Former tokens, for ITM."""
    attention_mask: torch.Tensor
    features: torch.Tensor
    """(M, E) L2-normalised ITC embeddings."""


class ImageTextScorer:
    def __init__(self, model: Stage1Model, tokenizer, image_processor: BlipImageProcessor, max_text_len: int = 32,
                 batch_size: int = 64):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_len = max_text_len
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> ImageTextScorer:
        """A `Blip2ForImageTextRetrieval` directory (a stage-1 export, or transformers' own), or a stage-1
        training checkpoint folder (checkpoints/step_NNNNNN)."""
        path = Path(path)
        if (path / "state.json").is_file():
            from fovea.training.build import load_from_checkpoint

            setup = load_from_checkpoint(path)
            if not isinstance(setup.model, Stage1Model):
                raise ValueError(f"{path} is a stage-2 checkpoint; scoring needs stage 1")
            return cls(setup.model, setup.tokenizer, setup.image_processor, **kwargs)
        config = AutoConfig.from_pretrained(path)
        model = Stage1Model(config, with_training_heads=False)
        load_weights(model, path)
        return cls(model, AutoTokenizer.from_pretrained(path), BlipImageProcessor.from_pretrained(path), **kwargs)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image] | torch.Tensor) -> ImageEmbeddings:
        """PIL images (preprocessed here) or pixel_values (N, 3, H, W)."""
        vision, features = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            pixels = chunk if isinstance(chunk, torch.Tensor) else self.image_processor(list(chunk))["pixel_values"]
            embeds = self.model.encode_images(pixels)
            vision.append(embeds)
            features.append(self.model.image_features(self.model.query_outputs(embeds)))
        return ImageEmbeddings(vision=torch.cat(vision), features=torch.cat(features))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> TextEmbeddings:
        text = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_text_len,
                              return_tensors="pt")
        features = [self.model.text_features(text.input_ids[s:s + self.batch_size],
                                             text.attention_mask[s:s + self.batch_size])
                    for s in range(0, len(texts), self.batch_size)]
        return TextEmbeddings(input_ids=text.input_ids, attention_mask=text.attention_mask,
                              features=torch.cat(features))

    @staticmethod
    def itc_scores(images: ImageEmbeddings, texts: TextEmbeddings) -> torch.Tensor:
        """(N, M): cosine similarity of image i's best-matching query with text j."""
        return torch.einsum("nqe,me->nmq", images.features, texts.features).amax(dim=-1)

    @torch.no_grad()
    def itm_logits(self, images: ImageEmbeddings | torch.Tensor, texts: TextEmbeddings,
                   pairs: Sequence[tuple[int, int]] | torch.Tensor) -> torch.Tensor:
        """(K, 2) [no match, match] logits of the (image index, text index) pairs. `images`: embeddings, or their
        `vision` (N, P, Dv) alone, all that ITM reads (a caller that caches images keeps just that)."""
        vision = images.vision if isinstance(images, ImageEmbeddings) else images
        pairs = torch.as_tensor(pairs, dtype=torch.long).view(-1, 2)
        out = []
        for start in range(0, len(pairs), self.batch_size):
            i, j = pairs[start:start + self.batch_size].unbind(1)
            out.append(self.model.itm_logits(vision[i], texts.input_ids[j], texts.attention_mask[j]))
        return torch.cat(out) if out else torch.zeros(0, 2)

    def itm_probs(self, images: ImageEmbeddings | torch.Tensor, texts: TextEmbeddings,
                  pairs: Sequence[tuple[int, int]] | torch.Tensor) -> torch.Tensor:
        """(K,) probability that image i and text j match, for each pair (i, j)."""
        return self.itm_logits(images, texts, pairs).softmax(dim=-1)[:, 1]
