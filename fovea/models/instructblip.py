"""InstructBLIP (Dai et al. 2023): BLIP-2 whose Q-Former also reads the instruction; an OPT or a Llama (Vicuna) LM.

What differs from `fovea.models.blip2`, and only that:
- the prompt, tokenized by the Q-Former's own (BERT) tokenizer, is embedded (word + position) and put after the
  learned queries; queries and instruction self-attend together, both directions, and only the queries
  cross-attend to the image and go through the query feed-forward (the instruction takes the text one: the Q-Former
  has its text branch);
- only the query rows leave the Q-Former for `language_projection`, so an image still fills `num_query_tokens`
  placeholders, but its rows depend on the instruction: the processor (`instructblip_processing`) hands the
  instruction's ids to `embed_multimodal` with each image and folds them into the image's hash.

Checkpoint names are transformers' `InstructBlipForConditionalGeneration`: the Q-Former's input LayerNorm is
`qformer.embeddings.layernorm` there and the shared Q-Former's `layernorm` here (it normalises [queries,
instruction] in both).
"""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from fovea.models.blip2 import Blip2ForConditionalGeneration
from fovea.models.blip2_processing import Blip2DummyInputsBuilder
from fovea.models.blip2_qformer import Blip2QFormerModel, QFormerTextEmbeddings
from fovea.models.instructblip_processing import InstructBlipMultiModalProcessor, InstructBlipProcessingInfo
from fovea.models.llama import LlamaForCausalLM
from fovea.multimodal.registry import MULTIMODAL_REGISTRY


class InstructBlipQFormerModel(Blip2QFormerModel):
    """The shared Q-Former with its text branch, plus the instruction's embeddings."""

    def __init__(self, config: PretrainedConfig):
        super().__init__(config, has_text_branch=True)
        self.embeddings = QFormerTextEmbeddings(config)

    def read_instruction(self, queries: torch.Tensor, input_ids: torch.Tensor,
                         image_features: torch.Tensor) -> torch.Tensor:
        """queries [1, Q, D], the instruction's ids [1, T], image_features [1, P, Dv] -> query rows [1, Q, D]."""
        num_query = queries.shape[1]
        embeds = torch.cat([queries, self.embeddings(input_ids).to(queries.dtype)], dim=1)  # (1, Q + T, D)
        return self(embeds, image_features, num_query=num_query)[:, :num_query]


@MULTIMODAL_REGISTRY.register_processor(
    InstructBlipMultiModalProcessor, info=InstructBlipProcessingInfo, dummy_inputs=Blip2DummyInputsBuilder
)
class InstructBlipForConditionalGeneration(Blip2ForConditionalGeneration):
    qformer_class = InstructBlipQFormerModel
    # Salesforce/instructblip-vicuna-* run a Llama-architecture LM (Vicuna); the flan-t5 ones an encoder-decoder
    language_models = {**Blip2ForConditionalGeneration.language_models, "llama": LlamaForCausalLM}
    packed_modules_mapping = {**Blip2ForConditionalGeneration.packed_modules_mapping,
                              "gate_up_proj": ["gate_proj", "up_proj"]}  # Llama's MLP

    @classmethod
    def pp_unsupported_reason(cls, hf_config) -> str | None:
        return "InstructBLIP has not been verified with pipeline parallelism"

    def rename_checkpoint_weight(self, name: str) -> str | None:
        if name.startswith("qformer.embeddings.layernorm."):
            return "qformer.layernorm." + name[len("qformer.embeddings.layernorm."):]
        return super().rename_checkpoint_weight(name)

    def _run_qformer(self, queries: torch.Tensor, image_features: torch.Tensor, qformer_input_ids: torch.Tensor,
                     qformer_num_tokens: torch.Tensor) -> torch.Tensor:
        # queries [B, Q, D], image_features [B, P, Dv]; qformer_input_ids [sum T_i] are the B instructions end to
        # end, qformer_num_tokens [B] their lengths. One image at a time: instructions differ in length, and
        # unpadded each is exactly transformers' batch-of-one computation.
        lengths = qformer_num_tokens.tolist()
        if len(lengths) != queries.shape[0] or sum(lengths) != qformer_input_ids.numel():
            raise ValueError(f"{queries.shape[0]} images need one instruction each: got lengths {lengths} for "
                             f"{qformer_input_ids.numel()} Q-Former token ids")
        instructions = qformer_input_ids.split(lengths)
        return torch.cat([self.qformer.read_instruction(queries[i:i + 1], ids[None], image_features[i:i + 1])
                          for i, ids in enumerate(instructions)])

    def embed_multimodal(
        self, pixel_values: torch.Tensor | None = None, qformer_input_ids: torch.Tensor | None = None,
        qformer_num_tokens: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """As BLIP-2's, and pixels come with their instructions (see `_run_qformer`); pre-computed
        `image_embeds` (language_projection outputs) already hold theirs."""
        if pixel_values is None:
            return super().embed_multimodal(image_embeds=image_embeds)
        if image_embeds is not None:
            raise ValueError("give pixel_values or image_embeds, not both")
        if qformer_input_ids is None or qformer_num_tokens is None:
            raise ValueError("InstructBLIP's pixel_values need qformer_input_ids and qformer_num_tokens (the "
                             "instruction the Q-Former reads with each image)")
        projected = self._encode_pixels(pixel_values, qformer_input_ids=qformer_input_ids,
                                        qformer_num_tokens=qformer_num_tokens)
        return list(self._image_rows(projected).unbind(0))
