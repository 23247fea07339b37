"""The trainable Q-Former against transformers' Blip2ForImageTextRetrieval / Blip2QFormerModel on the same
weights (float32): ITC similarities and ITM logits within 1e-5, ITG text rows equal to transformers' Q-Former
run with the full ITG attention mask, and names that load with nothing missing or left over."""
import pytest
import torch
from transformers import Blip2ForImageTextRetrieval

from fovea.training.losses import itg_attention_mask
from fovea.training.stage1 import Stage1Batch, Stage1Model
from fovea.training.weights import load_parts
from tests.training.tiny import qformer_tokenizer, random_pixels, randomize_, tiny_config

TEXTS = ["two small red circles", "one large blue square on a white background", "a green triangle",
         "three black diamonds and one small yellow circle on a gray background"]
PARTS = ("vision_model", "query_tokens", "embeddings", "qformer", "vision_projection", "text_projection", "itm_head")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, fovea scoring model) with the same random weights; cross-attention every
    second layer so layers with and without it are both covered."""
    torch.manual_seed(0)
    config = tiny_config(num_layers=3, cross_attention_frequency=2)
    hf = Blip2ForImageTextRetrieval(config).eval()
    randomize_(hf, seed=1)
    folder = tmp_path_factory.mktemp("itr")
    hf.save_pretrained(folder)
    ours = Stage1Model(config, with_training_heads=False).eval()
    load_parts(ours, folder, PARTS)
    return hf, ours


def tokens(texts, max_length=None):
    tok = qformer_tokenizer()
    padding = "max_length" if max_length else "longest"
    return tok(texts, padding=padding, max_length=max_length, return_tensors="pt")


def test_parameter_names_are_transformers_names(pair):
    hf, ours = pair
    assert set(dict(ours.named_parameters())) == set(dict(hf.named_parameters()))


@torch.no_grad()
def test_itc_similarities_equal_transformers(pair):
    hf, ours = pair
    pixels = random_pixels(3)
    text = tokens(TEXTS)
    expected = hf(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask,
                  use_image_text_matching_head=False)
    image_feats = ours.image_features(ours.query_outputs(ours.encode_images(pixels)))  # (3, Q, E)
    text_feats = ours.text_features(text.input_ids, text.attention_mask)  # (4, E)
    sim = torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)
    assert sim.shape == (3, 4)
    assert (sim - expected.logits_per_image).abs().max() < 1e-5
    assert (text_feats - expected.text_embeds).abs().max() < 1e-5
    assert sim.std() > 0.05  # not degenerate


@torch.no_grad()
def test_itm_logits_equal_transformers_with_padding(pair):
    hf, ours = pair
    pixels = random_pixels(4, seed=3)
    text = tokens(TEXTS)  # unequal lengths: padding masked
    assert (text.attention_mask == 0).any()
    expected = hf(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask,
                  use_image_text_matching_head=True).logits_per_image
    got = ours.itm_logits(ours.encode_images(pixels), text.input_ids, text.attention_mask)
    assert got.shape == (4, 2)
    assert (got - expected).abs().max() < 1e-5
    # padding is really ignored: more padding, same logits
    longer = tokens(TEXTS, max_length=24)
    again = ours.itm_logits(ours.encode_images(pixels), longer.input_ids, longer.attention_mask)
    assert (again - got).abs().max() < 1e-5


@torch.no_grad()
def test_itg_decoding_equals_transformers_qformer_under_the_itg_mask(pair):
    """fovea decodes text from the queries' cached layer inputs; transformers' Q-Former runs [queries, text]
    at once under the full (B, 1, Q+T, Q+T) ITG mask. The text rows must agree, and the query rows of that
    joint run must equal the query-only pass (queries never see text)."""
    hf, ours = pair
    pixels = random_pixels(4, seed=4)
    text = tokens(TEXTS)
    image_embeds = ours.encode_images(pixels)
    num_query = ours.num_query_tokens
    layer_inputs = []
    query_only = ours.query_outputs(image_embeds, layer_inputs)
    mask = itg_attention_mask(num_query, text.attention_mask)  # (B, Q+T, Q+T)
    got = ours.qformer.decode(ours.embeddings(text.input_ids), layer_inputs, mask[:, num_query:])
    joint = torch.cat([ours.query_tokens.expand(4, -1, -1), hf.embeddings(input_ids=text.input_ids)], dim=1)
    expected = hf.qformer(query_embeds=joint, query_length=num_query, attention_mask=mask[:, None],
                          encoder_hidden_states=image_embeds).last_hidden_state
    real = text.attention_mask.bool()
    assert (got[real] - expected[:, num_query:][real]).abs().max() < 1e-5
    assert (query_only - expected[:, :num_query]).abs().max() < 1e-5
    # causal: changing a later token leaves earlier rows alone
    changed = text.input_ids.clone()
    changed[:, 3] = 7
    again = ours.qformer.decode(ours.embeddings(changed), layer_inputs, mask[:, num_query:])
    assert torch.equal(again[:, :3], got[:, :3]) and (again[:, 3] - got[:, 3]).abs().max() > 1e-3


def test_gradient_checkpointing_changes_nothing():
    config = tiny_config()
    tok = qformer_tokenizer()
    text = tok(TEXTS, padding="max_length", max_length=16, return_tensors="pt")
    batch = Stage1Batch(input_ids=text.input_ids, attention_mask=text.attention_mask,
                        image_ids=torch.arange(4), pixel_values=random_pixels(4))
    results = []
    for use_checkpointing in (False, True):
        torch.manual_seed(0)
        model = Stage1Model(config, decoder_token_id=tok.bos_token_id).train()
        model.qformer.gradient_checkpointing = use_checkpointing
        out = model(batch, itm_generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-7, rtol=0), name
