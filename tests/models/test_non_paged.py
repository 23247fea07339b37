"""The serving decoders run without a KV cache (training, export): OPT and Qwen2 outside any attention
context give transformers' logits for one sequence; OPT over a left- and right-padded batch gives each
row's logits as transformers does (`fovea.training.lm.opt_logits`, used by stage 2 and LM pre-training)."""
from __future__ import annotations

import pytest
import torch
import transformers

from fovea.models.registry import resolve_model_class
from fovea.models.weights import load_weights
from fovea.training.lm import opt_logits

CONFIGS = {
    "opt": lambda: transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                          vocab_size=96, max_position_embeddings=40, word_embed_proj_dim=32),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                              max_position_embeddings=40, tie_word_embeddings=False),
}


def _pair(kind: str, folder):
    torch.manual_seed(0)
    config = CONFIGS[kind]()
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    hf.save_pretrained(folder)
    ours = resolve_model_class(hf.config.architectures)(hf.config).eval()
    load_weights(ours, folder)
    return hf, ours


@pytest.mark.parametrize("kind", list(CONFIGS))
@torch.no_grad()
def test_one_sequence_without_context_equals_transformers(kind, tmp_path):
    hf, ours = _pair(kind, tmp_path)
    input_ids = torch.randint(0, 96, (13,), generator=torch.Generator().manual_seed(1))
    got = ours.compute_logits(ours(input_ids, torch.arange(13)))  # no forward_context: no paging, no cache
    want = hf(input_ids[None]).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert want.std() > 0.1


@torch.no_grad()
def test_padded_opt_batch_equals_transformers_row_by_row(tmp_path):
    hf, ours = _pair("opt", tmp_path)
    ids = torch.randint(3, 96, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    got = opt_logits(ours, ours.get_input_embeddings()(ids), mask)
    for b in range(3):
        rows = mask[b].bool()
        want = hf(ids[b, rows][None]).logits[0]
        torch.testing.assert_close(got[b, rows], want, rtol=1e-4, atol=1e-4)
