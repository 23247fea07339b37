"""M-RoPE positions against transformers' `get_rope_index`, called on its own model instance.

Prompts are laid out as the processor lays them out (vision_start, the item's pads, vision_end, text around),
with grids of the sizes real inputs give; the positions and the delta for later tokens must be equal.
"""
from __future__ import annotations

import pytest
import torch

from fovea.engine.request import MultiModalFeature
from fovea.models.qwen2_5_vl_processing import mrope_input_positions
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl, hf_model, mm_token_type_ids


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_mrope"), tokens_per_second=2))


def layout(config, items: list[tuple[str, tuple[int, int, int], float | None]], text_len: int = 3):
    """ids and features for `text (start item end text)* text`; items: (modality, grid, second_per_grid_ts)."""
    ids, features = [7] * text_len, []
    for modality, grid, seconds in items:
        token = config.image_token_id if modality == "image" else config.video_token_id
        num = grid[0] * grid[1] * grid[2] // 4
        ids.append(config.vision_start_token_id)
        data = {f"{modality}_grid_thw": torch.tensor([grid])}
        if seconds is not None:
            data["second_per_grid_ts"] = torch.tensor([seconds], dtype=torch.float32)
        features.append(MultiModalFeature(modality, len(ids), num, f"h{len(features)}", data))
        ids += [token] * num + [config.vision_end_token_id] + [11] * text_len
    return ids, features


def hf_positions(ckpt, items, ids):
    model = hf_model(ckpt)
    input_ids = torch.tensor([ids])
    images = [torch.tensor(g) for m, g, _ in items if m == "image"]
    videos = [torch.tensor(g) for m, g, _ in items if m == "video"]
    seconds = [s for m, _, s in items if m == "video"]
    positions, delta = model.model.get_rope_index(
        input_ids, mm_token_type_ids(ckpt, input_ids),
        image_grid_thw=torch.stack(images) if images else None,
        video_grid_thw=torch.stack(videos) if videos else None,
        second_per_grid_ts=torch.tensor(seconds, dtype=torch.float32) if seconds else None,
    )
    return positions[:, 0], int(delta)


CASES = {
    "one image": [("image", (1, 10, 14), None)],
    "two images": [("image", (1, 4, 6), None), ("image", (1, 12, 8), None)],
    "tall image": [("image", (1, 26, 2), None)],
    "odd-frame video": [("video", (3, 4, 6), 1.0)],  # 5 frames at 2 fps: 3 temporal patches, 1 s each
    "video at 24 fps": [("video", (4, 6, 4), 2 / 24)],
    "video at 3 fps": [("video", (5, 2, 2), 2 / 3)],  # t * interval lands on integers: float32 rounding decides
    "long video, small frames": [("video", (9, 2, 4), 1.0)],  # temporal extent beyond max(h, w)
    "video and image": [("video", (3, 4, 6), 1.0), ("image", (1, 6, 10), None)],
    "image and video": [("image", (1, 6, 10), None), ("video", (2, 4, 4), 0.5)],
    "text only": [],
}


@pytest.mark.parametrize("case", list(CASES))
def test_positions_equal_get_rope_index(ckpt, case):
    items = CASES[case]
    config = hf_model(ckpt).config
    ids, features = layout(config, items)
    got, delta = mrope_input_positions(config, ids, features)
    want, want_delta = hf_positions(ckpt, items, ids)
    assert got.dtype == torch.long and got.shape == (3, len(ids))
    assert torch.equal(got, want), f"{case}: first difference at {(got != want).any(0).nonzero()[0].item()}"
    assert delta == want_delta


def test_features_in_any_order_and_adjacent_items(ckpt):
    """Features need not come sorted; two items with no text between them keep their own grids (transformers
    groups placeholder runs by token type, so it would read them as one item)."""
    config = hf_model(ckpt).config
    pad = config.image_token_id
    ids = [7, 7, 7] + [pad] * 4 + [pad] * 3 + [7]
    first = MultiModalFeature("image", 3, 4, "a", {"image_grid_thw": torch.tensor([[1, 4, 4]])})
    second = MultiModalFeature("image", 7, 3, "b", {"image_grid_thw": torch.tensor([[1, 2, 6]])})
    got, delta = mrope_input_positions(config, ids, [second, first])
    assert got[:, :7].tolist() == [[0, 1, 2, 3, 3, 3, 3], [0, 1, 2, 3, 3, 4, 4], [0, 1, 2, 3, 4, 3, 4]]
    assert got[:, 7:10].tolist() == [[5, 5, 5], [5, 5, 5], [5, 6, 7]]  # starts 2 (= max(4, 4) / 2) after the first
    assert got[:, 10].tolist() == [8, 8, 8] and delta == 9 - len(ids)


def test_grid_and_placeholder_length_must_agree(ckpt):
    config = hf_model(ckpt).config
    ids, features = layout(config, [("image", (1, 4, 4), None)])
    features[0].length += 1
    with pytest.raises(ValueError, match="needs 4"):
        mrope_input_positions(config, ids, features)
