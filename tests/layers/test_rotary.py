"""Scaled RoPE frequencies against transformers' own `ROPE_INIT_FUNCTIONS`, bit for bit."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from fovea.layers.attention import AttentionGroup, AttentionMetadata, forward_context
from fovea.layers.rotary import DynamicNTKRotaryEmbedding, build_rotary_embedding

PARAMS = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0},
}


def config(rope: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=64, rope_parameters=rope)


@pytest.mark.parametrize("rope_type", ["linear", "llama3"])
def test_static_frequencies_equal_transformers(rope_type):
    cfg = config(dict(PARAMS[rope_type]))
    expected, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    assert torch.equal(build_rotary_embedding(cfg, 64).inv_freq, expected)


@pytest.mark.parametrize("seq_len", [1, 64, 65, 100, 1000])
def test_dynamic_frequencies_equal_transformers_at_every_length(seq_len):
    cfg = config(dict(PARAMS["dynamic"]))
    rotary = build_rotary_embedding(cfg, 64)
    assert isinstance(rotary, DynamicNTKRotaryEmbedding)
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=torch.tensor(seq_len))
    assert torch.equal(rotary._inv_freq(seq_len), rotary.inv_freq if seq_len <= 64 else expected)
    if seq_len <= 64:
        assert torch.allclose(expected, rotary.inv_freq)  # transformers' own "reset" to the plain frequencies


def test_dynamic_takes_each_request_length_from_the_step():
    """Two requests in one flat batch: a decode at position 99 (length 100) and a 3-token chunk at 10..12 (length
    13): each token rotates with its own request's frequencies."""
    rotary = build_rotary_embedding(config(dict(PARAMS["dynamic"])), 64)
    positions = torch.tensor([99, 10, 11, 12])
    decode = AttentionGroup(q_index=torch.tensor([[0]]), block_table=torch.zeros(1, 1, dtype=torch.long), mask=None,
                            out_index=torch.tensor([0]), token_index=torch.tensor([0]),
                            context_lens=torch.tensor([100]), is_decode=True)
    chunk = AttentionGroup(q_index=torch.tensor([[1, 2, 3]]), block_table=torch.zeros(1, 1, dtype=torch.long),
                           mask=None, out_index=torch.tensor([0, 1, 2]), token_index=torch.tensor([1, 2, 3]),
                           context_lens=torch.tensor([13]), is_decode=False)
    with forward_context(AttentionMetadata(torch.zeros(4, dtype=torch.long), [decode, chunk], 4, 16)):
        cos, _ = rotary(positions, torch.float32)
    scaled = positions[:1, None].float() * rotary._inv_freq(100)
    plain = positions[1:, None].float() * rotary.inv_freq
    assert torch.equal(cos[:1], torch.cat([scaled, scaled], -1).cos())
    assert torch.equal(cos[1:], torch.cat([plain, plain], -1).cos())
