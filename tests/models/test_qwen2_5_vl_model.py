"""fovea's Qwen2.5-VL model code against transformers, driven step by step over a paged KV cache.

Each request goes through fovea's own processor (its pixels are checked against transformers' processors in
test_processing); transformers' `generate` gets the same ids and tensors. Greedy tokens must equal the
batch-size-1 reference and log_softmax of the logits must match within 1e-4 (float32): one request at a time,
every request in one flat batch (their items through the vision tower as one packed sequence), and with
prefill chunks that split an image.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from fovea.layers.attention import Attention, build_attention_metadata, forward_context
from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from fovea.models.weights import load_weights
from fovea.multimodal.media import LoadedVideo
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from tests.oracle.qwen2_5_vl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, build_tiny_qwen2_5_vl, hf_model, hf_reference

ATOL = 1e-4
NUM_STEPS = 5


def image(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def video(seed: int, num_frames: int, width: int, height: int, fps: float | None = None) -> LoadedVideo:
    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
    return LoadedVideo(frames, fps)


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


# name -> (prompt, images, videos); images of 150x200 cover 5x7 merged tokens in 2x2 windows, partial at the edges
CASES = {
    "image": (chat(f"{IMAGE_PLACEHOLDER}What is this?"), [image(0, 200, 150)], []),
    "two images, thin and tiny": (chat(f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER} Which one is bigger?"),
                                  [image(1, 700, 20), image(2, 12, 10)], []),
    "image above max_pixels": (chat(f"Describe the image in detail. {IMAGE_PLACEHOLDER}"), [image(3, 640, 480)], []),
    "odd-frame video": (chat(f"{VIDEO_PLACEHOLDER}What are the children doing?"), [], [video(4, 5, 160, 120)]),
    "video and image": (chat(f"{VIDEO_PLACEHOLDER}{IMAGE_PLACEHOLDER}Where is the dog?"), [image(5, 90, 60)],
                        [video(6, 4, 70, 100, fps=24.0)]),
    "text only": (chat("Hello world! Write a short caption for this photo."), [], []),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_model"), seed=0))


@pytest.fixture(scope="module")
def model(ckpt):
    config = transformers.AutoConfig.from_pretrained(ckpt)
    model = Qwen2_5_VLForConditionalGeneration(config).eval().requires_grad_(False)
    load_weights(model, ckpt)
    return model


@pytest.fixture(scope="module")
def processor(ckpt):
    config = transformers.AutoConfig.from_pretrained(ckpt)
    ctx = InputProcessingContext(ckpt, config, transformers.AutoTokenizer.from_pretrained(ckpt))
    return MULTIMODAL_REGISTRY.create_processor(Qwen2_5_VLForConditionalGeneration, ctx)


class Request:
    """A processed prompt: ids, features, M-RoPE positions, and what transformers' generate takes."""

    def __init__(self, name, processor, model, prompt, images, videos):
        mm = {k: v for k, v in (("image", images), ("video", videos)) if v}
        hashes = {m: [f"{name}-{m}-{i}" for i in range(len(v))] for m, v in mm.items()}
        inputs = processor.apply(prompt, mm, hashes)
        self.name, self.features = name, inputs.mm_features
        self.ids = torch.tensor(inputs.prompt_token_ids)
        self.positions, self.delta = model.get_mrope_input_positions(model.config, inputs.prompt_token_ids,
                                                                        self.features)
        self.hf_inputs = {}
        for key, modality in (("pixel_values", "image"), ("image_grid_thw", "image"), ("pixel_values_videos", "video"),
                              ("video_grid_thw", "video"), ("second_per_grid_ts", "video")):
            parts = [f.data[key] for f in self.features if f.modality == modality and key in f.data]
            self.hf_inputs[key] = torch.cat(parts) if parts else None
        self.is_multimodal = torch.zeros(len(self.ids), dtype=torch.bool)
        for f in self.features:
            self.is_multimodal[f.offset:f.offset + f.length] = True

    def reference(self, ckpt, num_steps=NUM_STEPS):
        return hf_reference(ckpt, self.ids, num_steps, **self.hf_inputs)


def encode(model, requests: list[Request]) -> dict[str, list[torch.Tensor]]:
    """Every item of every request through embed_multimodal, grouped as the runner groups them (by modality
    and input names): each call is one packed vision sequence over several requests' items."""
    groups: dict[tuple, list[tuple[Request, object]]] = {}
    for r in requests:
        for f in r.features:
            groups.setdefault((f.modality, tuple(sorted(f.data))), []).append((r, f))
    out: dict[str, list] = {r.name: [] for r in requests}
    for (_, keys), owners in groups.items():
        with torch.no_grad():
            embeds = model.embed_multimodal(**{k: torch.cat([f.data[k] for _, f in owners]) for k in keys})
        for (r, f), e in zip(owners, embeds):
            out[r.name].append((f.offset, e))
    return {name: [e for _, e in sorted(pairs, key=lambda p: p[0])] for name, pairs in out.items()}


class PagedSteps:
    """The runner's work for one step minus scheduling: flat batch, shuffled block tables, metadata.

    Unwritten slots hold large random garbage, so attending to one shows in the logits (not NaN: `Attention`
    gathers whole blocks, and the masked tail of a last block still meets softmax-times-V, where 0 * NaN is
    NaN). Block 0 stays zero and out of the pool, as the scheduler's null block.
    """

    def __init__(self, model, num_blocks: int = 160, block_size: int = 4):
        self.model, self.block_size = model, block_size
        garbage = torch.Generator().manual_seed(1)
        for layer in model.modules():
            if isinstance(layer, Attention):
                shape = (num_blocks * block_size, layer.num_kv_heads, layer.head_dim)
                layer.kv_cache = (torch.randn(shape, generator=garbage) * 1e3,
                                  torch.randn(shape, generator=garbage) * 1e3)
                layer.kv_cache[0][:block_size] = 0
                layer.kv_cache[1][:block_size] = 0
        self.free = (1 + torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(0))).tolist()
        self.tables: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}

    def step(self, chunks: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """chunks: (request, inputs_embeds [q, D], positions [3, q] or [q]) -> logprobs at each chunk's last token."""
        query_lens, context_lens, tables = [], [], []
        for name, embeds, _ in chunks:
            end = self.num_computed.get(name, 0) + embeds.shape[0]
            table = self.tables.setdefault(name, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            query_lens.append(embeds.shape[0])
            context_lens.append(end)
            tables.append(table)
            self.num_computed[name] = end
        meta = build_attention_metadata(query_lens, context_lens, tables, self.block_size)
        with torch.no_grad(), forward_context(meta):
            hidden = self.model(None, torch.cat([p for _, _, p in chunks], dim=-1),
                                inputs_embeds=torch.cat([e for _, e, _ in chunks]))
            last = torch.tensor(query_lens).cumsum(0) - 1
            return list(torch.log_softmax(self.model.compute_logits(hidden[last]), dim=-1))


def generate(model, requests: list[Request], chunk: int | None = None, num_steps=NUM_STEPS):
    """Prefill every request (in `chunk`-token pieces, all requests in each step), then decode them together."""
    mm = encode(model, requests)
    with torch.no_grad():
        embeds = {r.name: model.embed_input_ids(r.ids, mm[r.name], r.is_multimodal) for r in requests}
    steps, done = PagedSteps(model), {r.name: 0 for r in requests}
    out: dict[str, list[torch.Tensor]] = {r.name: [] for r in requests}
    while any(done[r.name] < len(r.ids) for r in requests):
        batch = []
        for r in requests:
            start = done[r.name]
            if start < len(r.ids):
                end = min(len(r.ids), start + (chunk or len(r.ids)))
                batch.append((r, embeds[r.name][start:end], r.positions[:, start:end]))
                done[r.name] = end
        for (r, _, _), logprobs in zip(batch, steps.step([(r.name, e, p) for r, e, p in batch])):
            if done[r.name] == len(r.ids):
                out[r.name].append(logprobs)
    for _ in range(num_steps - 1):
        batch = []
        for r in requests:
            token = torch.tensor([int(out[r.name][-1].argmax())])
            position = len(r.ids) + len(out[r.name]) - 1 + r.delta
            with torch.no_grad():
                batch.append((r.name, model.embed_input_ids(token), torch.full((3, 1), position)))
        for r, logprobs in zip(requests, steps.step(batch)):
            out[r.name].append(logprobs)
    return out


def check(ckpt, request: Request, got: list[torch.Tensor]) -> list[int]:
    ref_ids, ref_logprobs = request.reference(ckpt, len(got))
    tokens = []
    for step, (g, w) in enumerate(zip(got, ref_logprobs)):
        err = (g - w).abs().max().item()
        assert err < ATOL, f"{request.name}, step {step}: logprobs differ by {err:.2e}"
        tokens.append(int(g.argmax()))
    assert tokens == ref_ids, request.name
    return tokens


@pytest.fixture(scope="module")
def requests(processor, model):
    return {name: Request(name, processor, model, *case) for name, case in CASES.items()}


def test_cases_cover_what_they_say(requests):
    grids = {name: [f.data.get("image_grid_thw", f.data.get("video_grid_thw")).tolist()[0] for f in r.features]
             for name, r in requests.items()}
    assert grids["image"] == [[1, 10, 14]]  # 5x7 merged tokens: 2x2 windows, partial at two edges
    assert grids["two images, thin and tiny"][1] == [1, 4, 6]  # 12x10 pixels, grown to min_pixels
    assert grids["image above max_pixels"][0][1] * grids["image above max_pixels"][0][2] // 4 <= 48
    assert grids["odd-frame video"] == [[3, 4, 6]]  # 5 frames (the last repeated), shrunk to the video max_pixels
    assert [f.modality for f in requests["video and image"].features] == ["video", "image"]
    assert requests["odd-frame video"].delta != 0 and requests["text only"].delta == 0


def test_reference_is_not_trivial(ckpt, requests, processor, model):
    ids, _ = requests["image"].reference(ckpt)
    other = Request("other", processor, model, CASES["image"][0], [image(9, 200, 150)], [])
    assert len(set(ids)) > 2, ids
    assert other.reference(ckpt)[0] != ids, "the image does not change the answer"


@pytest.mark.parametrize("name", list(CASES))
def test_each_request_alone_matches_transformers(ckpt, model, requests, name):
    request = requests[name]
    check(ckpt, request, generate(model, [request])[name])


def test_all_requests_in_one_batch_match_transformers(ckpt, model, requests):
    batch = list(requests.values())
    out = generate(model, batch)
    for request in batch:
        check(ckpt, request, out[request.name])


def test_chunked_prefill_split_mid_image(ckpt, model, requests):
    batch = [requests["image"], requests["video and image"]]
    offsets = [(f.offset, f.offset + f.length) for r in batch for f in r.features]
    chunk = 7
    assert any(lo % chunk and lo // chunk < (hi - 1) // chunk for lo, hi in offsets)  # a chunk boundary inside an item
    out = generate(model, batch, chunk=chunk)
    for request in batch:
        check(ckpt, request, out[request.name])


def test_precomputed_image_embeds(ckpt, model, processor, requests):
    """image_embeds (the vision tower's output) with their grid, given as dict items, give the same answer."""
    request = requests["image"]
    feature = request.features[0]
    with torch.no_grad():
        hf_embeds = hf_model(ckpt).model.get_image_features(feature.data["pixel_values"],
                                                           feature.data["image_grid_thw"]).pooler_output[0]
    item = {"image_embeds": hf_embeds, "image_grid_thw": feature.data["image_grid_thw"][0]}
    embedded = Request("embeds", processor, model, CASES["image"][0], [item], [])
    assert torch.equal(embedded.ids, request.ids) and torch.equal(embedded.positions, request.positions)
    out = generate(model, [embedded])["embeds"]
    check(ckpt, request, out)
