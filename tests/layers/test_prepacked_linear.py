"""oneDNN-packed linear layers: same outputs as the dense layer, weights released, tied weights kept, off-switch."""
import pytest
import torch
from torch import nn

from fovea.layers.linear import PackedLinear, onednn_linear_available, prepack_linear_weights

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="oneDNN not available in this torch build")


class _Tiny(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.embed = nn.Embedding(50, 24, dtype=dtype)
        self.qkv = PackedLinear(24, {"q": 24, "k": 8, "v": 8}, bias=True).to(dtype)
        self.down = nn.Linear(40, 24, bias=False, dtype=dtype)
        self.head = nn.Linear(24, 50, bias=False, dtype=dtype)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(self.down(self.qkv(x)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_prepacked_layers_compute_what_the_dense_ones_did(dtype, tol):
    torch.manual_seed(0)
    model = _Tiny(dtype).eval()
    ids = torch.randint(0, 50, (7,))
    with torch.inference_mode():
        expected = model(ids).float()
        assert prepack_linear_weights(model) == 3
        got = model(ids).float()
        strided = model.qkv(torch.randn(5, 48, dtype=dtype)[:, ::2])  # non-contiguous input
    assert (got - expected).abs().max() <= tol * expected.abs().max()
    assert strided.shape == (5, 40)
    assert model.qkv.weight.numel() == 0 and model.qkv.weight.dtype == dtype  # dense copy released
    assert model.embed.weight.shape == (50, 24)  # the tied weight stays with the embedding
    assert model.qkv.split(model.qkv(torch.zeros(2, 24, dtype=dtype)))[1].shape == (2, 8)


def test_off_switch_leaves_the_model_alone(monkeypatch):
    monkeypatch.setenv("FOVEA_NO_ONEDNN_LINEAR", "1")
    model = _Tiny(torch.float32)
    assert prepack_linear_weights(model) == 0 and model.down.weight.shape == (24, 40)


def test_float16_and_mixed_bias_layers_are_left_dense():
    layer = nn.Linear(8, 8).half()
    mixed = nn.Linear(8, 8, dtype=torch.bfloat16)
    mixed.bias.data = mixed.bias.data.float()
    holder = nn.Sequential(layer, mixed)
    assert prepack_linear_weights(holder) == 0 and layer.weight.shape == (8, 8)


@pytest.mark.parametrize("rows", [1, 16, 17, 24, 32, 33, 40])
def test_bfloat16_row_counts_around_the_padded_range(rows):
    # 17-32 rows of bfloat16 go through oneDNN padded to 33 rows; every size returns exactly its own rows,
    # with the bias, each row equal to that row computed alone
    torch.manual_seed(0)
    layer = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    with torch.inference_mode():
        prepack_linear_weights(layer)
        got = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(rows)])
    assert got.shape == (rows, 48) and got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() <= 0.02 * expected.abs().max()
    assert (got.float() - alone.float()).abs().max() <= 0.02 * expected.abs().max()
