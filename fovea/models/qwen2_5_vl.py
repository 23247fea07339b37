"""Qwen2.5-VL (Bai et al. 2025): a ViT at native resolution, a 2x2 patch merger, and a Qwen2 decoder with M-RoPE.

An image (or video) is cut into 14x14 patches, two frames deep (an image is its own frame twice), so one item
is a grid of t x h x w patches. The vision tower runs over every item of a step as ONE packed sequence:

- patches are reordered window by window (windows of `window_size` pixels over the merged 2x2 grid) so each
  window is contiguous; most blocks attend within a window, the `fullatt_block_indexes` blocks within a
  whole frame (t = one temporal patch) of one item; nothing ever attends across items;
- 2-D RoPE on (row, column) of each patch; RMSNorm; gated SiLU MLP;
- the merger concatenates each 2x2 group (contiguous in the processor's patch order), applies RMSNorm and an
  MLP into the LM's hidden size, and the window order is undone.

So an item of t x h x w patches becomes t * h * w / 4 rows in the LM input, where its `<|image_pad|>` /
`<|video_pad|>` placeholders are. The LM is `Qwen2Model` with M-RoPE positions [3, N] (the input processor
computes them per request: `qwen2_5_vl_processing.mrope_input_positions`). Parameter names follow transformers 5
(`model.visual`, `model.language_model`, `lm_head`); checkpoints saved by transformers 4 (`visual.`,
`model.layers.`) load as well.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fovea.distributed import parallel_state as ps
from fovea.distributed.pipeline import IntermediateTensors, first_stage_only, last_stage_only, tied_lm_head_name
from fovea.engine.request import MultiModalFeature
from fovea.layers.encoder_attention import PackedSegments
from fovea.layers.linear import Linear
from fovea.layers.mlp import GatedMLP
from fovea.layers.norms import RMSNorm
from fovea.layers.rotary import RotaryEmbedding, VisionRotaryEmbedding, apply_rotary_packed, rope_parameters
from fovea.layers.vocab_parallel import ParallelLMHead
from fovea.models.interfaces import (SupportsLoRA, SupportsMRoPE, SupportsMultiModal, SupportsOutputRows, SupportsPP,
                                     SupportsQuant, SupportsTensorParallel)
from fovea.models.llama import LLAMA_LORA_TARGET_MODULES
from fovea.models.qwen2 import Qwen2Model, head_dim_of
from fovea.models.qwen2_5_vl_processing import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
    mrope_input_positions,
)
from fovea.models.utils import TokenEmbeddingsMixin
from fovea.multimodal.registry import MULTIMODAL_REGISTRY

# ---------------------------------------------------------------------------------------------- layout


@dataclass(slots=True)
class VisionLayout:
    """Where each patch of a packed batch of items goes: rotary coordinates, window order, attention runs.

    row_col      [N, 2]   (row, column) of each patch in the processor's order (2x2 groups contiguous)
    window_order [N / 4]  merged-group index at each position of the window-ordered sequence
    frame_runs   token counts of each (item, frame): full-attention runs
    window_runs  token counts of each (item, frame, window): window-attention runs
    """

    row_col: torch.Tensor
    window_order: torch.Tensor
    frame_runs: list[int]
    window_runs: list[int]

    @staticmethod
    def build(grid_thw: Sequence[Sequence[int]], merge: int, window: int) -> VisionLayout:
        """`window`: window side in merged units (window_size // merge // patch_size)."""
        row_col, order, frame_runs, window_runs = [], [], [], []
        offset = 0
        unit = merge * merge
        for t, h, w in grid_thw:
            mh, mw = h // merge, w // merge
            rows = torch.arange(h).view(mh, 1, merge, 1).expand(mh, mw, merge, merge).flatten()
            cols = torch.arange(w).view(1, mw, 1, merge).expand(mh, mw, merge, merge).flatten()
            row_col.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
            # tile each frame's merged grid with window x window squares from the top left; pad cells are -1
            nwh, nww = -(-mh // window), -(-mw // window)
            cells = torch.full((t, nwh * window, nww * window), -1, dtype=torch.long)
            cells[:, :mh, :mw] = torch.arange(t * mh * mw).view(t, mh, mw)
            cells = cells.view(t, nwh, window, nww, window).permute(0, 1, 3, 2, 4).reshape(t * nwh * nww, -1)
            is_real = cells >= 0
            order.append(cells[is_real] + offset)
            window_runs += (is_real.sum(-1) * unit).tolist()
            frame_runs += [h * w] * t
            offset += t * mh * mw
        return VisionLayout(torch.cat(row_col), torch.cat(order), frame_runs, window_runs)


# ---------------------------------------------------------------------------------------------- vision tower


class VisionPatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (T, P, P) over one patch each: a matmul, done as one.

    The weight keeps the checkpoint's Conv3d shape [D, C, T, P, P]; pixel rows are flattened (C, T, P, P).
    """

    def __init__(self, in_channels: int, temporal_patch: int, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(dim, in_channels, temporal_patch, patch, patch))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [N, C*T*P*P] -> [N, D]
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.view(weight.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, runs: PackedSegments) -> torch.Tensor:
        n = x.shape[0]
        # rotary in float32 whatever the model dtype (cos, sin are), as transformers does for the vision tower
        qkv = apply_rotary_packed(self.qkv(x), cos, sin, 2 * self.num_heads)
        q, k, v = qkv.view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each (N, nh, hs)
        out = runs.attend(q, k, v, scale=self.head_dim**-0.5)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = RMSNorm(dim, eps=1e-6)
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, config.num_heads)
        self.mlp = GatedMLP(dim, config.intermediate_size, config.hidden_act, bias=True)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                runs: PackedSegments) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D]: the previous block's MLP output, not yet added into `residual` (None in the first block, where
        x is the stream itself). Returns (this block's MLP output, the stream before it): each residual add runs
        inside the next RMSNorm's fused kernel, rounded where transformers' `hidden_states + ...` rounds."""
        if residual is None:
            h, residual = self.norm1(x), x
        else:
            h, residual = self.norm1(x, residual)
        h, residual = self.norm2(self.attn(h, cos, sin, runs), residual)
        return self.mlp(h), residual


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int):
        super().__init__()
        self.merged_dim = dim * merge * merge
        self.ln_q = RMSNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(Linear(self.merged_dim, self.merged_dim), nn.GELU(),
                                 Linear(self.merged_dim, out_dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        # [N, D] -> [N / merge^2, out_dim]; x + residual (the last block's MLP output and the stream) is added
        # inside ln_q's fused kernel (no blocks: x is the stream)
        h = self.ln_q(x) if residual is None else self.ln_q(x, residual)[0]
        return self.mlp(h.view(-1, self.merged_dim))


class Qwen2_5_VisionTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.merge = config.spatial_merge_size
        self.patch_size = config.patch_size
        self.temporal_patch_size = config.temporal_patch_size
        self.in_channels = getattr(config, "in_channels", None) or getattr(config, "in_chans", 3)
        self.window = config.window_size // self.merge // self.patch_size
        if self.window < 1:
            raise ValueError(f"window_size {config.window_size} is smaller than one merged patch "
                             f"({self.merge * self.patch_size} pixels)")
        self.fullatt_block_indexes = set(config.fullatt_block_indexes)
        self.patch_embed = VisionPatchEmbed(self.in_channels, self.temporal_patch_size, self.patch_size,
                                            config.hidden_size)
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.rotary = VisionRotaryEmbedding(config.hidden_size // config.num_heads, theta)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config.out_hidden_size, config.hidden_size, self.merge)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def forward(self, pixel_values: torch.Tensor, grid_thw: Sequence[Sequence[int]]) -> torch.Tensor:
        # pixel_values [N, C*T*P*P] for all items, packed; -> [N / merge^2, out_hidden] in the same order
        layout = VisionLayout.build(grid_thw, self.merge, self.window)
        n, unit = pixel_values.shape[0], self.merge**2
        x = self.patch_embed(pixel_values)  # (N, D)
        x = x.view(n // unit, unit, -1)[layout.window_order].view(n, -1)
        cos, sin = self.rotary(layout.row_col.view(n // unit, unit, 2)[layout.window_order].view(n, 2))
        frames, windows = PackedSegments(layout.frame_runs), PackedSegments(layout.window_runs)
        residual = None
        for i, block in enumerate(self.blocks):
            x, residual = block(x, residual, cos, sin, frames if i in self.fullatt_block_indexes else windows)
        merged = self.merger(x, residual)  # (N / unit, out), window order
        restored = torch.empty_like(merged)
        restored[layout.window_order] = merged
        return restored


# ---------------------------------------------------------------------------------------------- glue


class Qwen2_5_VLModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        text_config = config.text_config
        rope = rope_parameters(text_config)
        if "mrope_section" not in rope:
            raise ValueError("Qwen2.5-VL's text config needs rope_parameters['mrope_section']")
        rotary = RotaryEmbedding(head_dim_of(text_config), rope["rope_theta"], rope["mrope_section"])
        self.visual = first_stage_only(lambda: Qwen2_5_VisionTransformer(config.vision_config))
        self.language_model = Qwen2Model(text_config, rotary)


@MULTIMODAL_REGISTRY.register_processor(Qwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class Qwen2_5_VLForConditionalGeneration(TokenEmbeddingsMixin, nn.Module, SupportsMultiModal, SupportsMRoPE,
                                         SupportsQuant, SupportsLoRA, SupportsTensorParallel, SupportsPP,
                                         SupportsOutputRows):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    language_model_modules = ("model.language_model",)
    lm_head_module = "lm_head"
    lora_layers_prefix = "model.language_model.layers."  # the LM only: the vision blocks have gate/up/down too
    lora_target_modules = LLAMA_LORA_TARGET_MODULES

    def __init__(self, config):
        super().__init__()
        self.config = config
        text_config = config.text_config
        self.model = Qwen2_5_VLModel(config)
        self.lm_head = last_stage_only(lambda: ParallelLMHead(text_config.hidden_size, text_config.vocab_size,
                                                              bias=False))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings and ps.pp_size() == 1:
            self.lm_head.tie_to(self.model.language_model.embed_tokens)
        if config.vision_config.out_hidden_size != text_config.hidden_size:
            raise ValueError(f"vision out_hidden_size {config.vision_config.out_hidden_size} != text hidden_size "
                             f"{text_config.hidden_size}")

    def get_text_config(self):
        return self.config.text_config

    def rename_checkpoint_weight(self, name: str) -> str | None:
        if name.startswith("visual."):  # transformers 4 layout (the released Qwen checkpoints)
            name = "model." + name
        elif name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
            name = "model.language_model." + name[len("model."):]
        return tied_lm_head_name(name, self.tie_word_embeddings, "model.language_model.embed_tokens.weight")

    # ------------------------------------------------------------------ vision

    def _grids(self, grid_thw: torch.Tensor, what: str) -> list[tuple[int, int, int]]:
        grid = torch.as_tensor(grid_thw).reshape(-1, 3)
        merge = self.model.visual.merge
        grids = [tuple(int(v) for v in row) for row in grid.tolist()]
        for t, h, w in grids:
            if t < 1 or h % merge or w % merge or h < 1 or w < 1:
                raise ValueError(f"{what} rows must be (t >= 1, h, w) with h and w multiples of {merge}; "
                                 f"got {(t, h, w)}")
        return grids

    def embed_multimodal(
        self,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,  # positions only (computed by the input processor)
    ) -> list[torch.Tensor]:
        """One [t*h*w/4, hidden] tensor per item: images first, then videos, each in the order given.

        Pixels of every item (images and videos alike) go through the vision tower as one packed sequence.
        pixel_values / pixel_values_videos [sum t*h*w, C*T*P*P] with grids [num_items, 3]; or precomputed
        image_embeds / video_embeds [sum t*h*w/4, hidden] with their grids.
        """
        del second_per_grid_ts
        visual = self.model.visual
        merge_unit = visual.merge**2
        hidden = self.config.text_config.hidden_size
        outputs: list[torch.Tensor | None] = []  # one per item; None until the tower has run
        pixels, pixel_grids, pixel_slots = [], [], []
        for name, values, embeds, grid_thw in (("image", pixel_values, image_embeds, image_grid_thw),
                                               ("video", pixel_values_videos, video_embeds, video_grid_thw)):
            if values is None and embeds is None:
                continue
            if values is not None and embeds is not None:
                raise ValueError(f"give {name} pixels or {name}_embeds, not both")
            if grid_thw is None:
                raise ValueError(f"{name} inputs need {name}_grid_thw")
            grids = self._grids(grid_thw, f"{name}_grid_thw")
            rows = [t * h * w // merge_unit for t, h, w in grids]
            if embeds is not None:
                if tuple(embeds.shape) != (sum(rows), hidden):
                    raise ValueError(f"{name}_embeds must be [{sum(rows)}, {hidden}] for grids {grids}, "
                                     f"got {list(embeds.shape)}")
                outputs += list(embeds.to(self.lm_head.params_dtype).split(rows))
                continue
            num_patches = sum(t * h * w for t, h, w in grids)
            if tuple(values.shape) != (num_patches, visual.patch_dim):
                raise ValueError(f"{name} pixels must be [{num_patches}, {visual.patch_dim}] for grids {grids}, "
                                 f"got {list(values.shape)}")
            pixels.append(values)
            pixel_grids += grids
            pixel_slots += range(len(outputs), len(outputs) + len(grids))
            outputs += [None] * len(grids)
        if pixels:
            dtype = visual.patch_embed.proj.weight.dtype
            encoded = visual(torch.cat([p.to(dtype) for p in pixels]), pixel_grids)  # (sum rows, hidden)
            for slot, piece in zip(pixel_slots, encoded.split([t * h * w // merge_unit for t, h, w in pixel_grids])):
                outputs[slot] = piece
        return outputs

    # ------------------------------------------------------------------ positions

    @classmethod
    def get_mrope_input_positions(
        cls, hf_config, input_tokens: Sequence[int], mm_features: Sequence[MultiModalFeature]
    ) -> tuple[torch.Tensor, int]:
        return mrope_input_positions(hf_config, input_tokens, mm_features)

    # ------------------------------------------------------------------ language model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
        intermediate_tensors: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """positions [3, N] M-RoPE (a [N] tensor is read as text positions, the same on all three rows)."""
        if ps.is_first_stage():
            inputs_embeds = self.resolve_inputs_embeds(input_ids, inputs_embeds)
        if positions.dim() == 1:
            positions = positions.expand(3, -1)
        return self.model.language_model(inputs_embeds, positions, intermediate_tensors)

    def intermediate_shapes(self, num_tokens: int) -> dict[str, tuple[int, ...]]:
        return {"hidden_states": (num_tokens, self.config.text_config.hidden_size)}

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [n, hidden]
        return self.lm_head(hidden_states)  # [n, vocab]
