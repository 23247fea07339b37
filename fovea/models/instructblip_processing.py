"""InstructBLIP's multimodal processing: BLIP-2's (image tokens before BOS, BLIP pixels), plus the instruction for
the Q-Former, as transformers' `InstructBlipProcessor` makes it: the prompt text tokenized a second time by the
Q-Former's own tokenizer (`qformer_tokenizer/` in the checkpoint; [CLS] ... [SEP], no truncation).

The Q-Former's ids go with each image (flat, with their count, so items of different lengths concatenate) and into
the image's hash: the same image under two instructions gives two different embeddings, so the two must share
neither encoder-cache entries nor prefix-cache blocks. A prompt given as token ids (as chat makes it) is decoded
without special tokens to get its text back, the text the Q-Former tokenizer would have been given.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

from fovea.models.blip2_processing import Blip2MultiModalProcessor, Blip2ProcessingInfo
from fovea.multimodal.processing import MultiModalInputs

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"


class InstructBlipProcessingInfo(Blip2ProcessingInfo):
    @functools.cached_property
    def qformer_tokenizer(self) -> Any:
        path = Path(self.ctx.model_dir) / QFORMER_TOKENIZER_DIR
        try:
            return transformers.AutoTokenizer.from_pretrained(str(path))
        except OSError as err:
            raise ValueError(f"InstructBLIP needs the Q-Former's tokenizer in {path} (what InstructBlipProcessor."
                             f"save_pretrained writes): {err}") from err

    def get_max_instruction_tokens(self) -> int:
        return self.get_hf_config().qformer_config.max_position_embeddings


class InstructBlipMultiModalProcessor(Blip2MultiModalProcessor):
    info: InstructBlipProcessingInfo

    def apply(self, prompt: str | list[int], mm_items: Mapping[str, list[Any]], mm_hashes: Mapping[str, list[str]],
              mm_kwargs: Mapping[str, Any] | None = None) -> MultiModalInputs:
        images = mm_items.get("image") or []
        if not images or all(isinstance(item, torch.Tensor) for item in images):  # text only, or image_embeds
            return super().apply(prompt, mm_items, mm_hashes, mm_kwargs)
        text = prompt if isinstance(prompt, str) else self.info.get_tokenizer().decode(prompt, skip_special_tokens=True)
        ids = list(self.info.qformer_tokenizer(text).input_ids)
        most = self.info.get_max_instruction_tokens()
        if len(ids) > most:
            raise ValueError(f"the prompt is {len(ids)} tokens for InstructBLIP's Q-Former, which reads at most "
                             f"{most} (its max_position_embeddings); shorten the prompt")
        digest = hashlib.sha256(repr(ids).encode()).hexdigest()[:16]
        hashes = {m: [f"{h}:instruction-{digest}" for h in hs] for m, hs in mm_hashes.items()}
        inputs = super().apply(prompt, mm_items, hashes, mm_kwargs)
        for feature in inputs.mm_features:
            if "pixel_values" in feature.data:
                feature.data["qformer_input_ids"] = torch.tensor(ids, dtype=torch.long)
                feature.data["qformer_num_tokens"] = torch.tensor([len(ids)], dtype=torch.long)
        return inputs
