"""Stage 2 against transformers on the same weights (float32): fovea's padded OPT forward equals
OPTForCausalLM's logits, and the stage-2 loss equals Blip2ForConditionalGeneration's loss for the same
labels; the text layout and label masking are checked by hand."""
import pytest
import torch
from transformers import Blip2ForConditionalGeneration

from fovea.training.lm import opt_logits
from fovea.training.losses import IGNORE_INDEX, stage2_labels
from fovea.training.stage2 import Stage2Batch, Stage2Model, tokenize_stage2
from fovea.training.weights import load_parts
from tests.training.tiny import opt_tokenizer, random_pixels, randomize_, tiny_config

CAPTIONS = ["two small red circles", "one large blue square on a white background", "yes"]
PROMPTS = ["", "", "Question: is there a red circle? Answer:"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tok = opt_tokenizer()
    config = tiny_config(text_input=False)
    config.image_token_index = len(tok)  # one spare vocabulary row past the tokenizer: the image placeholder
    assert config.image_token_index < config.text_config.vocab_size
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config).eval()
    randomize_(hf, seed=2, gain=1.2)
    folder = tmp_path_factory.mktemp("blip2")
    hf.save_pretrained(folder)
    ours = Stage2Model(config).eval()
    load_parts(ours, folder, ["vision_model", "query_tokens", "qformer", "language_projection", "language_model"])
    return hf, ours


def test_tokenize_puts_bos_prompt_text_eos_and_pads_right():
    tok = opt_tokenizer()
    ids, mask, prompt_lengths = tokenize_stage2(tok, CAPTIONS, PROMPTS)
    for i, (caption, prompt) in enumerate(zip(CAPTIONS, PROMPTS)):
        head = tok(prompt).input_ids
        body = tok((" " + caption) if prompt else caption, add_special_tokens=False).input_ids
        row = head + body + [tok.eos_token_id]
        assert ids[i, :len(row)].tolist() == row and mask[i].sum() == len(row)
        assert (ids[i, len(row):] == tok.pad_token_id).all()
        assert prompt_lengths[i] == len(head)
    assert head[0] == tok.bos_token_id
    # the text decodes back, and a prompt-free text comes straight after BOS
    assert tok.decode(ids[0, 1:int(mask[0].sum()) - 1]) == CAPTIONS[0]


def test_labels_mask_queries_bos_prompt_and_padding():
    tok = opt_tokenizer()
    ids, mask, prompt_lengths = tokenize_stage2(tok, CAPTIONS, PROMPTS)
    labels = stage2_labels(ids, mask, num_query=3, prompt_lengths=prompt_lengths)
    for i in range(3):
        n, p = int(mask[i].sum()), int(prompt_lengths[i])
        expected = [IGNORE_INDEX] * 3 + [IGNORE_INDEX] * p + ids[i, p:n].tolist() + [IGNORE_INDEX] * (ids.shape[1] - n)
        assert labels[i].tolist() == expected


@torch.no_grad()
def test_padded_opt_forward_equals_transformers(pair):
    hf, ours = pair
    tok = opt_tokenizer()
    ids, mask, _ = tokenize_stage2(tok, CAPTIONS, PROMPTS)
    expected = hf.language_model(input_ids=ids, attention_mask=mask).logits
    got = opt_logits(ours.language_model, ours.language_model.get_input_embeddings()(ids), mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() < 1e-5
    # left padding too (positions count real tokens only)
    num_pad = (mask == 0).sum(dim=1)
    left_ids = torch.stack([torch.cat([r.new_full((int(n),), tok.pad_token_id), r[m.bool()]])
                            for r, m, n in zip(ids, mask, num_pad)])
    left_mask = torch.stack([torch.cat([torch.zeros(int(n), dtype=torch.long), m[m.bool()]])
                             for m, n in zip(mask, num_pad)])
    expected_left = hf.language_model(input_ids=left_ids, attention_mask=left_mask).logits
    got_left = opt_logits(ours.language_model, ours.language_model.get_input_embeddings()(left_ids), left_mask)
    assert (got_left[left_mask.bool()] - expected_left[left_mask.bool()]).abs().max() < 1e-5
    assert (got_left[left_mask.bool()] - got[real]).abs().max() < 1e-5


@torch.no_grad()
def test_stage2_loss_equals_transformers(pair):
    hf, ours = pair
    tok = opt_tokenizer()
    ids, mask, prompt_lengths = tokenize_stage2(tok, CAPTIONS, PROMPTS)
    pixels = random_pixels(3, seed=5)
    num_query = ours.num_query_tokens
    got = ours(Stage2Batch(input_ids=ids, attention_mask=mask, prompt_lengths=prompt_lengths, pixel_values=pixels))
    hf_ids = torch.cat([torch.full((3, num_query), hf.config.image_token_index), ids], dim=1)
    hf_mask = torch.cat([torch.ones(3, num_query, dtype=torch.long), mask], dim=1)
    labels = stage2_labels(ids, mask, num_query, prompt_lengths)
    expected = hf(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, labels=labels).loss
    assert abs(got.loss.item() - expected.item()) < 1e-5
    assert 1.0 < expected.item() < 50.0


def test_only_the_qformer_queries_and_projection_train(pair):
    _, ours = pair
    trainable = {n.split(".")[0] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"query_tokens", "qformer", "language_projection"}
    ours.train()
    assert ours.qformer.training and not ours.language_model.training and not ours.vision_model.training
    ours.eval()
