"""LoRALinearMethod on hand-sized tensors against the formula y = x W^T + b + scale * (x A^T) B^T per row group,
including a packed layer where an adapter on one shard changes that shard's output rows only."""
from __future__ import annotations

import pytest
import torch

from fovea.layers.linear import Linear, LinearMethod, PackedLinear, prepare_linear_layer
from fovea.lora.adapter import LoRALayerWeights
from fovea.lora.layers import LoRALinearMethod, LoRAMapping, lora_context


def lora_layer(layer, num_slots=2, max_rank=4):
    prepare_linear_layer(layer)
    method = LoRALinearMethod(layer.method, num_slots, max_rank)
    method.create_lora_weights(layer, torch.float32)
    layer.method = method
    return method


def test_rows_of_each_slot_get_their_adapter_and_other_rows_the_base():
    torch.manual_seed(0)
    layer = Linear(6, 5, bias=True)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    method = lora_layer(layer)
    a0, b0 = torch.randn(2, 6), torch.randn(5, 2)
    a1, b1 = torch.randn(3, 6), torch.randn(5, 3)
    method.set_slot(layer, 0, {None: LoRALayerWeights(a0, b0)})
    method.set_slot(layer, 1, {None: LoRALayerWeights(a1, b1)})
    x = torch.randn(7, 6)
    base = x @ w.T + b
    with torch.no_grad():
        assert torch.allclose(layer(x), base, atol=1e-5)  # no mapping: the base layer alone
        mapping = LoRAMapping([(0, slice(1, 3)), (1, torch.tensor([0, 5, 6]))])
        with lora_context(mapping):
            y = layer(x)
    expected = base.clone()
    expected[1:3] += x[1:3] @ a0.T @ b0.T
    expected[[0, 5, 6]] += x[[0, 5, 6]] @ a1.T @ b1.T
    assert torch.allclose(y, expected, atol=1e-5)
    assert method.name.startswith("lora(") and "method=lora(" in repr(layer)
    assert set(layer.state_dict()) == {"weight", "bias"}  # the checkpoint's tensors, not the adapter slots


def test_adapter_on_one_shard_of_a_packed_layer_changes_only_its_rows():
    torch.manual_seed(1)
    layer = PackedLinear(6, {"q_proj": 4, "k_proj": 2, "v_proj": 2}, bias=False)
    w = layer.weight.detach().clone()
    method = lora_layer(layer, num_slots=1, max_rank=4)
    aq, bq = torch.randn(3, 6), torch.randn(4, 3)
    av, bv = torch.randn(2, 6), torch.randn(2, 2)  # a lower rank on another shard: padded with zeros
    method.set_slot(layer, 0, {"q_proj": LoRALayerWeights(aq, bq), "v_proj": LoRALayerWeights(av, bv)})
    x = torch.randn(3, 6)
    with torch.no_grad(), lora_context(LoRAMapping([(0, slice(0, 3))])):
        y = layer(x)
    base = x @ w.T
    assert torch.allclose(y[:, :4], base[:, :4] + x @ aq.T @ bq.T, atol=1e-5)
    assert torch.allclose(y[:, 4:6], base[:, 4:6], atol=1e-5)  # k: untouched
    assert torch.allclose(y[:, 6:], base[:, 6:] + x @ av.T @ bv.T, atol=1e-5)
    method.set_slot(layer, 0, None)  # an adapter that leaves the layer alone
    with torch.no_grad(), lora_context(LoRAMapping([(0, slice(0, 3))])):
        assert torch.allclose(layer(x), base, atol=1e-5)


def test_a_method_it_cannot_wrap_is_a_clear_error():
    class W8A16(LinearMethod):  # what an int8 method looks like to LoRA: not one it knows to be dense
        name = "w8a16"

    with pytest.raises(ValueError, match="runs 'w8a16'.*LoRA with quantized weights is not supported"):
        LoRALinearMethod(W8A16(), 1, 4)


def test_adapters_run_over_a_layer_running_from_the_checkpoints_pages():
    """bfloat16 q/k/v loaded shard by shard onto the in-place method (`BF16RowsLinearMethod`: each projection kept
    as it arrived, no stacked weight): the adapter adds to its shard's rows exactly as over any base method."""
    from fovea.kernels import rows_linear
    from fovea.kernels.runtime import cpu_has_amx
    from fovea.layers.linear import no_weight_init, packing_shards_at_load
    from fovea.layers.linear_methods import BF16RowsLinearMethod, in_place_layers

    if not rows_linear.available() or cpu_has_amx():
        pytest.skip("the in-place kernel runs on CPUs with AVX-512 BF16 and without AMX")
    torch.manual_seed(2)
    sizes = {"q_proj": 48, "k_proj": 16, "v_proj": 16}
    shards = {name: torch.randn(rows, 40).bfloat16() for name, rows in sizes.items()}
    with no_weight_init(), in_place_layers("all"):
        layer = PackedLinear(40, sizes, bias=False, dtype=torch.bfloat16)
        with packing_shards_at_load():
            for name in ("v_proj", "q_proj", "k_proj"):  # any order
                layer.weight.weight_loader(layer.weight, shards[name], name)
        prepare_linear_layer(layer)
    assert isinstance(layer.method, BF16RowsLinearMethod) and "weight" not in dict(layer.named_parameters())
    method = LoRALinearMethod(layer.method, 1, 4)
    method.create_lora_weights(layer, torch.bfloat16)
    layer.method = method
    aq, bq = torch.randn(3, 40).bfloat16(), torch.randn(48, 3).bfloat16()
    method.set_slot(layer, 0, {"q_proj": LoRALayerWeights(aq, bq)})
    x = torch.randn(5, 40).bfloat16()
    with torch.no_grad(), lora_context(LoRAMapping([(0, slice(0, 5))])):
        y = layer(x).float()
    base = x.float() @ torch.cat(list(shards.values())).float().T
    expected = base.clone()
    expected[:, :48] += (x.float() @ aq.float().T) @ bq.float().T
    assert "method=lora(avx512-bf16-rows)" in repr(layer)
    assert (y - expected).abs().max() <= 0.02 * expected.abs().max()
    assert (y[:, 48:] - base[:, 48:]).abs().max() <= 0.01 * base.abs().max()  # k, v: the base alone
