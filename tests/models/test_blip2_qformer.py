"""One Q-Former for serving and training: the same parameter names either way, dropout only in a model built
for training (a serving one is deterministic even in train mode), and the query branch's output unchanged by
the text branch being there. Parity with transformers: tests/models/test_blip2_model.py (serving) and
tests/training/test_qformer.py (text branch, masks, ITG decoding)."""
from __future__ import annotations

import re

import torch
from transformers import Blip2QFormerConfig

from fovea.models.blip2_qformer import Blip2QFormerModel


def _config(dropout: float) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              cross_attention_frequency=1, encoder_hidden_size=24, use_qformer_text_input=True,
                              hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def _pair(dropout: float = 0.3) -> tuple[Blip2QFormerModel, Blip2QFormerModel]:
    torch.manual_seed(0)
    serving = Blip2QFormerModel(_config(dropout))
    for p in serving.parameters():
        torch.nn.init.normal_(p, std=0.3)
    training = Blip2QFormerModel(_config(dropout), has_text_branch=True, has_dropout=True)
    training.load_state_dict(serving.state_dict(), strict=True)
    return serving, training


def test_same_names_serving_and_training():
    serving, training = _pair()
    assert set(dict(serving.named_parameters())) == set(dict(training.named_parameters()))
    assert any(".intermediate.dense." in n for n, _ in serving.named_parameters())  # the text branch is loaded
    no_text = Blip2QFormerModel(_config(0.0), has_text_branch=False)
    text_branch = re.compile(r"encoder\.layer\.\d+\.(intermediate|output)\.")
    assert not any(text_branch.match(n) for n, _ in no_text.named_parameters())
    assert sum(bool(text_branch.match(n)) for n, _ in serving.named_parameters()) == 2 * 6


@torch.no_grad()
def test_dropout_only_in_a_model_built_for_training():
    serving, training = _pair()
    gen = torch.Generator().manual_seed(1)
    queries, image = torch.randn(2, 4, 32, generator=gen), torch.randn(2, 5, 24, generator=gen)
    reference = serving.eval()(queries, image)
    assert torch.equal(serving.train()(queries, image), reference)  # serving: no dropout in train mode either
    assert torch.equal(training.eval()(queries, image), reference)
    assert (training.train()(queries, image) - reference).abs().max() > 1e-3


@torch.no_grad()
def test_query_rows_of_a_joint_pass_ignore_masked_text():
    """[queries, text] with the text's keys masked for the queries (ITG's pattern): query rows equal the
    query-only pass, whatever the text."""
    serving, _ = _pair()
    serving.eval()
    gen = torch.Generator().manual_seed(2)
    queries, image, text = torch.randn(2, 4, 32, generator=gen), torch.randn(2, 5, 24, generator=gen), \
        torch.randn(2, 3, 32, generator=gen)
    mask = torch.ones(2, 7, 7, dtype=torch.bool)
    mask[:, :4, 4:] = False
    joint = serving(torch.cat([queries, text], dim=1), image, num_query=4, attention_mask=mask)
    torch.testing.assert_close(joint[:, :4], serving(queries, image), rtol=0, atol=1e-6)
    layer_inputs = []
    serving(queries, image, layer_inputs=layer_inputs)
    torch.testing.assert_close(serving.decode(text, layer_inputs, mask[:, 4:]), joint[:, 4:], rtol=0, atol=1e-6)


@torch.no_grad()
def test_queries_from_their_first_self_attention_equal_the_whole_pass():
    """Serving computes the first layer's self-attention of the learned queries once (it sees no image) and runs
    the rest per image batch: the same rows as the whole pass, with one cross-attention layer and with two."""
    for frequency in (1, 2):
        config = _config(0.0)
        config.cross_attention_frequency = frequency
        torch.manual_seed(3)
        model = Blip2QFormerModel(config).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
        gen = torch.Generator().manual_seed(4)
        queries, image = torch.randn(1, 4, 32, generator=gen), torch.randn(3, 5, 24, generator=gen)
        whole = model(queries.expand(3, -1, -1), image)
        torch.testing.assert_close(model.forward_queries(model.first_self_attention(queries), image), whole,
                                   rtol=0, atol=1e-6)
        assert (whole[0] - whole[1]).abs().max() > 1e-2  # the images matter: the rows are not the prefix's
