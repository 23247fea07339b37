"""The processing framework on hand-made token sequences: insertions, replacements, is_embed, errors."""
from __future__ import annotations

import pytest
import torch

from fovea.multimodal.processing import (
    MultiModalFieldConfig,
    PromptIndexTargets,
    PromptInsertion,
    PromptReplacement,
    PromptUpdateDetails,
    apply_prompt_updates,
)

IMG, VID, START, END = 90, 91, 80, 81


def test_insertion_at_start_for_each_item_in_order():
    ids, ranges = apply_prompt_updates([2, 5, 6], [PromptInsertion("image", PromptIndexTargets.start(),
                                                                   lambda i: [IMG] * (3 + i))], {"image": 2})
    assert ids == [IMG] * 3 + [IMG] * 4 + [2, 5, 6]
    assert [(r.offset, r.length) for r in ranges["image"]] == [(0, 3), (3, 4)]


def test_insertion_after_prefix_and_missing_prefix():
    ids, ranges = apply_prompt_updates([2, 5, 6], [PromptInsertion("image", PromptIndexTargets.prefix([2]),
                                                                   lambda i: [IMG, IMG])], {"image": 1})
    assert ids == [2, IMG, IMG, 5, 6] and (ranges["image"][0].offset, ranges["image"][0].length) == (1, 2)
    with pytest.raises(ValueError, match="insert"):
        apply_prompt_updates([3, 5], [PromptInsertion("image", PromptIndexTargets.prefix([2]), lambda i: [IMG])],
                             {"image": 1})


def test_replacements_interleave_modalities_with_full_vs_features():
    # <start> <pad> <end> per item; only the pad tokens take embeddings
    def image(i):
        return PromptUpdateDetails.select_token_id([START] + [IMG] * (2 + i) + [END], IMG)

    def video(i):
        return [VID] * 5

    prompt = [1, IMG, 7, VID, 8, IMG, 9]
    ids, ranges = apply_prompt_updates(prompt, [PromptReplacement("image", [IMG], image),
                                                PromptReplacement("video", [VID], video)], {"image": 2, "video": 1})
    assert ids == [1, START, IMG, IMG, END, 7, VID, VID, VID, VID, VID, 8, START, IMG, IMG, IMG, END, 9]
    img0, img1 = ranges["image"]
    (vid0,) = ranges["video"]
    assert (img0.offset, img0.length, img0.is_embed) == (1, 4, [False, True, True, False])
    assert (vid0.offset, vid0.length, vid0.is_embed) == (6, 5, None)
    assert (img1.offset, img1.length) == (12, 5)
    assert sum(img1.is_embed) == 3
    for r in (img0, vid0, img1):  # every range points at the tokens it claims
        assert all(ids[r.offset + k] in (IMG, VID, START, END) for k in range(r.length))


@pytest.mark.parametrize("prompt, count, needle", [
    ([1, IMG, 2], 2, "1 image placeholder"),
    ([1, IMG, 2, IMG], 1, "more image placeholders"),
])
def test_placeholder_count_must_match_items(prompt, count, needle):
    with pytest.raises(ValueError, match=needle):
        apply_prompt_updates(prompt, [PromptReplacement("image", [IMG], lambda i: [IMG] * 3)], {"image": count})


def test_field_configs_split_per_item():
    batched = MultiModalFieldConfig.batched("image").split(torch.arange(6).view(3, 2))
    assert [t.tolist() for t in batched] == [[[0, 1]], [[2, 3]], [[4, 5]]]
    flat = MultiModalFieldConfig.flat_from_sizes("image", [1, 3]).split(torch.arange(4))
    assert [t.tolist() for t in flat] == [[0], [1, 2, 3]]


def test_merge_counts_must_match():
    from fovea.models.utils import merge_multimodal_embeddings

    embeds = torch.zeros(5, 2)
    mask = torch.tensor([False, True, True, False, False])
    merged = merge_multimodal_embeddings(embeds, [torch.ones(2, 2)], mask)
    assert merged[mask].eq(1).all() and merged[~mask].eq(0).all()
    with pytest.raises(ValueError, match="2 placeholder positions but 3"):
        merge_multimodal_embeddings(embeds, [torch.ones(3, 2)], mask)
