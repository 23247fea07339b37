"""fovea's BLIP-2 model code against transformers, driven step by step over a paged KV cache.

Inputs come from transformers' own Blip2Processor, so only the model code is under test here: greedy tokens
must equal transformers' batch-size-1 generate, and log_softmax of the logits must match within 1e-4 (fp32),
for whole prefills, prefills chunked 3 tokens at a time, and two requests sharing every step's flat batch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from fovea.layers.attention import Attention, build_attention_metadata, forward_context
from fovea.models.blip2 import Blip2ForConditionalGeneration
from fovea.models.registry import resolve_model_class
from fovea.models.weights import load_weights
from tests.oracle.blip2 import build_tiny_blip2, hf_inputs, hf_reference, load_hf

ATOL = 1e-4
NUM_STEPS = 6
PROMPT = "Question: how many cats are there? Answer:"
OTHER_PROMPT = "A picture of"

# Seeds picked so every configuration's greedy reference changes token from step to step (see
# test_reference_is_not_trivial): a test whose answer is one repeated token could pass with broken code.
CONFIGS = {
    "default": dict(seed=0),
    "proj_dim": dict(seed=2, word_embed_proj_dim=16),
    "post_norm": dict(seed=0, do_layer_norm_before=False, cross_attention_frequency=2),
    "no_bias": dict(
        seed=3,
        num_layers=3,
        cross_attention_frequency=2,
        text_config_overrides=dict(enable_bias=False, layer_norm_elementwise_affine=False),
    ),
}


def make_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 52, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: build_tiny_blip2(tmp_path_factory.mktemp(name), **kw) for name, kw in CONFIGS.items()}


_MODELS: dict[str, torch.nn.Module] = {}


def fovea_model(model_dir) -> torch.nn.Module:
    key = str(model_dir)
    if key not in _MODELS:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        model = resolve_model_class(config.architectures)(config).eval().requires_grad_(False)
        load_weights(model, model_dir)
        _MODELS[key] = model
    return _MODELS[key]


class PagedSteps:
    """What the engine's runner does for one step, minus scheduling: flat batch, block tables, metadata.

    Blocks are handed out from a shuffled pool so no request's KV sits in consecutive slots. Unwritten slots
    hold large random garbage, so attending to one shows up in the logits. (Not NaN: `Attention` gathers
    whole blocks, and the masked tail of a request's last block still passes through softmax-times-V, where
    0 * NaN would be NaN. In the engine those slots hold zeros or finite stale values.) Block 0 stays zero
    and out of the pool, as the scheduler's null block.
    """

    def __init__(self, model, num_blocks: int = 48, block_size: int = 4):
        self.model, self.block_size = model, block_size
        for layer in model.modules():
            if isinstance(layer, Attention):
                shape = (num_blocks * block_size, layer.num_kv_heads, layer.head_dim)
                garbage = torch.Generator().manual_seed(1)
                k_cache = torch.randn(shape, generator=garbage) * 1e3
                v_cache = torch.randn(shape, generator=garbage) * 1e3
                k_cache[:block_size] = 0
                v_cache[:block_size] = 0
                layer.kv_cache = (k_cache, v_cache)
        self.free = (1 + torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(0))).tolist()
        self.tables: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}

    def step(self, chunks: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """chunks: (request, inputs_embeds [q, D]) in flat order -> logprobs of each chunk's last token."""
        query_lens, context_lens, tables, positions = [], [], [], []
        for req, embeds in chunks:
            start = self.num_computed.get(req, 0)
            end = start + embeds.shape[0]
            table = self.tables.setdefault(req, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            query_lens.append(end - start)
            context_lens.append(end)
            tables.append(table)
            positions.append(torch.arange(start, end))
            self.num_computed[req] = end
        meta = build_attention_metadata(query_lens, context_lens, tables, self.block_size)
        with torch.no_grad(), forward_context(meta):
            hidden = self.model(None, torch.cat(positions), inputs_embeds=torch.cat([e for _, e in chunks]))
            last = torch.tensor(query_lens).cumsum(0) - 1
            return torch.log_softmax(self.model.compute_logits(hidden[last]), dim=-1)


def prompt_embeds(model, model_dir, prompt, image, image_embeds=None) -> torch.Tensor:
    """The merged input embeddings [L, D] of a prompt, from transformers' processor output."""
    inputs = hf_inputs(model_dir, prompt, image)
    input_ids = inputs["input_ids"][0]
    with torch.no_grad():
        if image is None:
            return model.embed_input_ids(input_ids)
        if image_embeds is not None:
            mm = model.embed_multimodal(image_embeds=image_embeds)
        else:
            mm = model.embed_multimodal(pixel_values=inputs["pixel_values"])
        return model.embed_input_ids(input_ids, mm, input_ids == model.config.image_token_index)


def token_embeds(model, token_id: int) -> torch.Tensor:
    with torch.no_grad():
        return model.embed_input_ids(torch.tensor([token_id]))


def assert_step_matches(got: torch.Tensor, want: torch.Tensor, what: str) -> int:
    err = (got - want).abs().max().item()
    assert err < ATOL, f"{what}: logprobs differ by {err:.2e}"
    token = int(got.argmax())
    assert token == int(want.argmax()), f"{what}: greedy token {token} vs transformers {int(want.argmax())}"
    return token


def run_single(model, model_dir, embeds, chunk: int | None, num_steps: int) -> list[torch.Tensor]:
    """Prefill (whole, or `chunk` tokens per step), then greedy decode; logprobs per generated token."""
    steps = PagedSteps(model)
    chunk = chunk or embeds.shape[0]
    for start in range(0, embeds.shape[0], chunk):
        logprobs = steps.step([("a", embeds[start:start + chunk])])[0]
    out = [logprobs]
    for _ in range(num_steps - 1):
        out.append(steps.step([("a", token_embeds(model, int(out[-1].argmax())))])[0])
    return out


def check_against_reference(got: list[torch.Tensor], model_dir, prompt, image) -> None:
    ref_ids, ref_logprobs = hf_reference(model_dir, prompt, image, len(got))
    tokens = [assert_step_matches(g, w, f"step {i}") for i, (g, w) in enumerate(zip(got, ref_logprobs))]
    assert tokens == ref_ids


@pytest.mark.parametrize("config", list(CONFIGS))
def test_reference_is_not_trivial(checkpoints, config):
    ids_a, _ = hf_reference(checkpoints[config], PROMPT, make_image(0), NUM_STEPS)
    ids_b, _ = hf_reference(checkpoints[config], PROMPT, make_image(1), NUM_STEPS)
    assert len(set(ids_a)) > 2, ids_a
    assert ids_a != ids_b, "the image does not change the answer"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_prefill_and_decode_match_transformers(checkpoints, config):
    model_dir = checkpoints[config]
    model = fovea_model(model_dir)
    embeds = prompt_embeds(model, model_dir, PROMPT, make_image(0))
    check_against_reference(run_single(model, model_dir, embeds, None, NUM_STEPS), model_dir, PROMPT, make_image(0))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_text_only_matches_transformers(checkpoints, config):
    model_dir = checkpoints[config]
    model = fovea_model(model_dir)
    embeds = prompt_embeds(model, model_dir, OTHER_PROMPT, None)
    check_against_reference(run_single(model, model_dir, embeds, None, NUM_STEPS), model_dir, OTHER_PROMPT, None)


def test_chunked_prefill_matches_transformers(checkpoints):
    model_dir = checkpoints["default"]
    model = fovea_model(model_dir)
    embeds = prompt_embeds(model, model_dir, PROMPT, make_image(0))
    assert embeds.shape[0] % 3 != 0  # the last chunk is a short one
    check_against_reference(run_single(model, model_dir, embeds, 3, NUM_STEPS), model_dir, PROMPT, make_image(0))


def test_two_requests_in_one_flat_batch(checkpoints):
    """Step 1: all of A's prefill + B's first 5 tokens; step 2: A's decode + the rest of B; then both decode."""
    model_dir = checkpoints["default"]
    model = fovea_model(model_dir)
    requests = {"a": (PROMPT, make_image(0)), "b": (OTHER_PROMPT, make_image(1))}
    embeds = {r: prompt_embeds(model, model_dir, p, img) for r, (p, img) in requests.items()}
    refs = {r: hf_reference(model_dir, p, img, NUM_STEPS)[1] for r, (p, img) in requests.items()}
    steps = PagedSteps(model)
    a0, b_partial = steps.step([("a", embeds["a"]), ("b", embeds["b"][:5])])
    token_a = assert_step_matches(a0, refs["a"][0], "a step 0")
    a1, b0 = steps.step([("a", token_embeds(model, token_a)), ("b", embeds["b"][5:])])
    tokens = {
        "a": assert_step_matches(a1, refs["a"][1], "a step 1"),
        "b": assert_step_matches(b0, refs["b"][0], "b step 0"),
    }
    done = {"a": 2, "b": 1}
    for _ in range(NUM_STEPS - 2):
        out = steps.step([(r, token_embeds(model, tokens[r])) for r in ("b", "a")])
        for r, logprobs in zip(("b", "a"), out):
            tokens[r] = assert_step_matches(logprobs, refs[r][done[r]], f"{r} step {done[r]}")
            done[r] += 1


@pytest.mark.parametrize("config", ["default", "proj_dim"])
def test_image_embeds_equal_pixels(checkpoints, config):
    """transformers' own language_projection output, fed as image_embeds, gives what pixels give."""
    model_dir = checkpoints[config]
    model = fovea_model(model_dir)
    hf_model, _ = load_hf(model_dir)
    pixel_values = hf_inputs(model_dir, PROMPT, make_image(0))["pixel_values"]
    with torch.no_grad():
        hf_embeds = hf_model.get_image_features(pixel_values).pooler_output  # [1, Q, hidden]
        from_pixels = model.embed_multimodal(pixel_values=pixel_values)
        for image_embeds in (hf_embeds, hf_embeds[0]):
            from_embeds = model.embed_multimodal(image_embeds=image_embeds)
            assert len(from_embeds) == 1
            torch.testing.assert_close(from_embeds[0], from_pixels[0], atol=1e-5, rtol=1e-5)
    embeds = prompt_embeds(model, model_dir, PROMPT, make_image(0), image_embeds=hf_embeds)
    check_against_reference(run_single(model, model_dir, embeds, None, 2), model_dir, PROMPT, make_image(0))


def test_batched_images_equal_single(checkpoints):
    model = fovea_model(checkpoints["default"])
    pixels = torch.cat([hf_inputs(checkpoints["default"], PROMPT, make_image(i))["pixel_values"] for i in range(2)])
    with torch.no_grad():
        both = model.embed_multimodal(pixel_values=pixels)
        one = model.embed_multimodal(pixel_values=pixels[1:])
    assert [tuple(t.shape) for t in both] == [(8, 32), (8, 32)]
    torch.testing.assert_close(both[1], one[0], atol=1e-5, rtol=1e-5)


def test_bad_multimodal_inputs_are_rejected(checkpoints):
    model: Blip2ForConditionalGeneration = fovea_model(checkpoints["default"])
    with pytest.raises(ValueError, match=r"\[num_images, 3, 30, 30\], got \[1, 3, 32, 32\]"):
        model.embed_multimodal(pixel_values=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"image_embeds must be \[num_images, 8, 32\].*got \[1, 7, 32\]"):
        model.embed_multimodal(image_embeds=torch.zeros(1, 7, 32))
    assert model.embed_multimodal() == []
    input_ids = torch.tensor([5, 6, 7, 8])
    with pytest.raises(ValueError, match="2 placeholder positions but 8 multimodal embedding rows"):
        model.embed_input_ids(input_ids, [torch.zeros(8, 32)], torch.tensor([True, True, False, False]))


def test_model_interface(checkpoints):
    model = fovea_model(checkpoints["default"])
    assert model.supports_multimodal is True
    assert model.num_query_tokens == 8
    assert model.get_text_config().model_type == "opt"
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(layers) == 2 and {(m.num_kv_heads, m.head_dim) for m in layers} == {(4, 8)}


def test_first_query_attention_is_kept_until_its_weights_change(checkpoints):
    """The Q-Former's first self-attention of the learned queries runs once per model (it sees no image), and
    again when a weight it depends on changes in place (new weights loaded into the same parameters)."""
    model_dir = checkpoints["default"]
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = resolve_model_class(config.architectures)(config).eval().requires_grad_(False)  # as the engine builds it
    load_weights(model, model_dir)
    pixels = torch.randn(2, 3, 30, 30)
    calls = []
    model.qformer.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        first = model.embed_multimodal(pixel_values=pixels)
        second = model.embed_multimodal(pixel_values=pixels)
        assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, second))
        saved = model.query_tokens.clone()
        model.query_tokens.mul_(-1.0)  # (a constant shift would not do: the embedding LayerNorm removes it)
        changed = model.embed_multimodal(pixel_values=pixels)
        assert len(calls) == 2 and (changed[0] - first[0]).abs().max() > 1e-3
        model.query_tokens.copy_(saved)
        again = model.embed_multimodal(pixel_values=pixels)
        assert len(calls) == 3 and all(torch.equal(a, b) for a, b in zip(again, first))
    with torch.no_grad():  # training-style calls run the whole Q-Former
        model.train()
        model.embed_multimodal(pixel_values=pixels)
        assert len(calls) == 4
