"""fovea's T5 model code against transformers' T5ForConditionalGeneration: the position buckets, and teacher-forced
logits over whole sequences (no KV cache) for every checkpoint form: Flan-T5 (gated GELU) and T5 v1.0 (ReLU), as
transformers 5.23 saves them (`scale_decoder_outputs`) and in the Hub's older forms (`tie_word_embeddings` false
with an own `lm_head`, or true with the d_model ** -0.5 rescale)."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from fovea.models.registry import resolve_model_class
from fovea.models.t5 import relative_position_bucket
from fovea.models.weights import load_model
from tests.oracle.t5 import build_tiny_t5, load_hf


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (6, 7)])
def test_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-300, 301)[None, :] - torch.zeros(1, 1, dtype=torch.long)
    ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    ref = HFT5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                                  max_distance=max_distance)
    assert torch.equal(ours, ref)
    assert len(ours.unique()) > num_buckets // 2  # exact and logarithmic buckets both reached


FORMS = [(None, True), (None, False), ("flan", True), ("v1", False)]


@pytest.mark.parametrize("hub_form,flan", FORMS)
def test_logits_equal_transformers(tmp_path, hub_form, flan):
    model_dir = build_tiny_t5(tmp_path, seed=1, flan=flan, hub_form=hub_form)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model, _ = load_model(resolve_model_class(config.architectures), config, model_dir, torch.float32)
    # Flan's own lm_head is loaded untied and nothing rescales; the others project with the token table, rescaled
    assert model.is_lm_head_tied == (hub_form != "flan")
    assert model.scale_decoder_outputs == (hub_form != "flan")
    hf, tokenizer = load_hf(str(model_dir))
    gen = torch.Generator().manual_seed(0)
    encoder_ids = torch.randint(3, config.vocab_size, (1, 45), generator=gen)  # past max_distance (20)
    decoder_ids = torch.cat([torch.zeros(1, 1, dtype=torch.long),
                             torch.randint(3, config.vocab_size, (1, 29), generator=gen)], dim=1)
    with torch.no_grad():
        ref = hf(input_ids=encoder_ids, decoder_input_ids=decoder_ids).logits
        got = model.forward_dense(model.shared(encoder_ids), decoder_ids)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_decoder_deeper_or_shallower_than_encoder(tmp_path):
    """num_decoder_layers is read as its own depth (a 3-layer decoder over a 2-layer encoder)."""
    model_dir = build_tiny_t5(tmp_path, seed=2, num_layers=2, num_decoder_layers=3)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model, _ = load_model(resolve_model_class(config.architectures), config, model_dir, torch.float32)
    assert (len(model.encoder.block), len(model.decoder.block)) == (2, 3)
    hf, _ = load_hf(str(model_dir))
    ids = torch.arange(3, 20)[None]
    dec = torch.tensor([[0, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_dense(model.shared(ids), dec),
                                   hf(input_ids=ids, decoder_input_ids=dec).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wo_dtype_follows_transformers(tmp_path, dtype):
    """transformers keeps T5's `wo` in float32 in a float16 model only (`_keep_in_fp32_modules`); a bfloat16 one
    runs it in bfloat16, and so does fovea's."""
    model_dir = build_tiny_t5(tmp_path, seed=1)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model, _ = load_model(resolve_model_class(config.architectures), config, model_dir, dtype)
    hf, _ = load_hf(str(model_dir), dtype=dtype)
    for stack, hf_stack in ((model.encoder, hf.encoder), (model.decoder, hf.decoder)):
        for block, hf_block in zip(stack.block, hf_stack.block):
            assert block.layer[-1].DenseReluDense.wo.params_dtype == hf_block.layer[-1].DenseReluDense.wo.weight.dtype
            assert block.layer[-1].DenseReluDense.wi_0.params_dtype == dtype
    assert model.decoder.block[0].layer[-1].DenseReluDense.wo.params_dtype == (
        torch.float32 if dtype == torch.float16 else torch.bfloat16)
