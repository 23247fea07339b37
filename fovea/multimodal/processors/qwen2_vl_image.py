"""Qwen2-VL's image processor (also Qwen2.5-VL's)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fovea.multimodal.processors.qwen2_vl_base import QwenVisionProcessor
from fovea.multimodal.processors.transforms import convert_to_rgb, pil_value_table


class Qwen2VLImageProcessor(QwenVisionProcessor):
    """transformers' `Qwen2VLImageProcessorPil` (the PIL path, as qwen-vl-utils preprocesses).

    Per image: to RGB -> one Pillow resize to `smart_resize`'s size -> rescale and normalise (a 256-entry table
    per channel, as BLIP's) -> patches of (C, temporal_patch_size, P, P) values, the image repeated over the
    temporal patch, ordered so each merge_size x merge_size group of patches is contiguous.
    """

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """-> {"pixel_values": float32 [sum grid_h*grid_w, C*T*P*P], "image_grid_thw": long [num_images, 3]}."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("no images to process")
        table = torch.from_numpy(pil_value_table(self.do_rescale, self.rescale_factor, self.do_normalize,
                                                 self.image_mean, self.image_std)).view(-1)
        patches, grids = [], []
        for image in images:
            if self.do_convert_rgb:
                image = convert_to_rgb(image)
            elif image.mode != "RGB":
                raise ValueError(f"image has mode {image.mode!r} and do_convert_rgb is off; the model needs RGB")
            height, width = self.resized_size(image.height, image.width)
            if self.do_resize:
                image = image.resize((width, height), resample=self.resample)
            pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
            patches.append(self._patchify(pixels.unsqueeze(0), table))
            grids.append([1, height // self.patch_size, width // self.patch_size])
        return {"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def _patchify(self, pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        # pixels (1, H, W, C) uint8 -> (gh*gw, C*T*P*P) float32; uint8 is rearranged first, then looked up
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        _, height, width, channels = pixels.shape
        gh, gw = height // p, width // p
        x = pixels.view(gh // m, m, p, gw // m, m, p, channels)
        x = x.permute(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, C, ph, pw)
        values = table[x.long() + 256 * torch.arange(channels).view(channels, 1, 1)]
        values = values.unsqueeze(5).expand(gh // m, gw // m, m, m, channels, t, p, p)
        return values.reshape(gh * gw, channels * t * p * p)
