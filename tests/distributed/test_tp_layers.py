"""Each tensor-parallel layer in 2 real ranks (gloo) equals the unsplit layer loaded from the same checkpoint file,
with the linear method each would run (oneDNN in float32, fovea's AVX-512 BF16 kernel or oneDNN in bfloat16, int8).

A rank builds both: the plain layer (Linear, PackedLinear, nn.Embedding: never split) and the parallel one, loads
both through `load_weights` from one safetensors file, and compares its slice (column layers) or the whole
output (row layers, the MLP, embeddings, lm_head) on the same input."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fovea.distributed import parallel_state as ps
from fovea.layers.linear import Linear, LinearBase, PackedLinear, onednn_linear_available, prepare_linear_layers
from fovea.layers.mlp import GatedMLP
from fovea.layers.parallel_linear import (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                          heads_per_rank)
from fovea.layers.quantization.int8 import Int8LinearMethod
from fovea.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from fovea.models.weights import load_weights
from tests.distributed.ranks import run_ranks

TP = 2
HIDDEN, HEAD_DIM, NUM_HEADS, VOCAB, WIDE = 32, 4, 4, 13, 24  # VOCAB: 7 + 6 rows, the last rank padded
QKV_CASES = {"mha": 4, "gqa": 2, "mqa": 1}  # KV heads: split 2 + 2, 1 + 1, replicated (each rank the one head)


class Layers(nn.Module):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, parallel: bool):
        super().__init__()
        self.col = ColumnParallelLinear(HIDDEN, WIDE) if parallel else Linear(HIDDEN, WIDE)
        self.row = RowParallelLinear(WIDE, HIDDEN) if parallel else Linear(WIDE, HIDDEN)
        for name, kv in {**QKV_CASES, "fused": 2}.items():
            sizes = {"q_proj": NUM_HEADS * HEAD_DIM, "k_proj": kv * HEAD_DIM, "v_proj": kv * HEAD_DIM}
            layer = (QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, kv) if parallel
                     else PackedLinear(HIDDEN, sizes))
            self.add_module(name, nn.Module())
            getattr(self, name).qkv_proj = layer
        self.mlp = GatedMLP(HIDDEN, WIDE, "silu", bias=True, tensor_parallel=parallel)
        self.embed = VocabParallelEmbedding(VOCAB, HIDDEN) if parallel else nn.Embedding(VOCAB, HIDDEN)
        self.head = ParallelLMHead(HIDDEN, VOCAB, bias=False) if parallel else Linear(HIDDEN, VOCAB, bias=False)
        self.tied_embed = VocabParallelEmbedding(VOCAB, HIDDEN) if parallel else nn.Embedding(VOCAB, HIDDEN)
        self.tied_head = ParallelLMHead(HIDDEN, VOCAB, bias=False) if parallel else Linear(HIDDEN, VOCAB, bias=False)
        if parallel:
            self.tied_head.tie_to(self.tied_embed)
        else:
            self.tied_head.weight = self.tied_embed.weight


def write_checkpoint(model_dir) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(p.shape, generator=gen) for name, p in Layers(parallel=False).state_dict().items()
               if not name.startswith("tied_head.")}
    for name in list(tensors):  # the checkpoint's separate projections, except "fused", stored stacked
        if ".qkv_proj." in name and not name.startswith("fused."):
            q, k, v = tensors.pop(name).split([NUM_HEADS * HEAD_DIM, *[tensors_kv(name)] * 2])
            for shard, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                tensors[name.replace("qkv_proj", shard)] = t.contiguous()
        if ".gate_up_proj." in name:
            gate, up = tensors.pop(name).chunk(2)
            tensors[name.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            tensors[name.replace("gate_up_proj", "up_proj")] = up.contiguous()
    save_file(tensors, str(model_dir / "model.safetensors"))


def tensors_kv(name: str) -> int:
    return QKV_CASES[name.split(".")[0]] * HEAD_DIM


def _load(model_dir, parallel: bool, dtype: torch.dtype, int8: bool) -> Layers:
    model = Layers(parallel).to(dtype).requires_grad_(False)
    if int8:
        for layer in (model.col, model.row, model.mlp.gate_up_proj, model.mlp.down_proj):
            layer.method = Int8LinearMethod()
    load_weights(model, model_dir)
    prepare_linear_layers(model)
    return model


def _compare_in_rank(model_dir, dtype: torch.dtype, int8: bool) -> dict:
    rank = ps.tp_rank()
    ref, par = _load(model_dir, False, dtype, int8), _load(model_dir, True, dtype, int8)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, HIDDEN, generator=gen).to(dtype)
    wide = torch.randn(5, WIDE, generator=gen).to(dtype)
    ids = torch.tensor([0, 6, 7, 12, 3, 12, 7])
    per_rank = WIDE // TP
    out = {
        "col": (par.col(x), ref.col(x)[:, rank * per_rank:(rank + 1) * per_rank]),
        "row": (par.row(wide[:, rank * per_rank:(rank + 1) * per_rank]), ref.row(wide)),
        "mlp": (par.mlp(x), ref.mlp(x)),
        "embed": (par.embed(ids), ref.embed(ids)),
        "head": (par.head(x), ref.head(x)),
        "tied_embed": (par.tied_embed(ids), ref.tied_embed(ids)),
        "tied_head": (par.tied_head(x), ref.tied_head(x)),
    }
    for name, kv in {**QKV_CASES, "fused": 2}.items():
        got = getattr(par, name).qkv_proj
        q, k, v = getattr(ref, name).qkv_proj.split(getattr(ref, name).qkv_proj(x))
        heads, kv_heads = got.num_heads, got.num_kv_heads
        first_kv = rank * kv_heads if kv >= TP else rank * kv // TP
        kv_cols = slice(first_kv * HEAD_DIM, (first_kv + kv_heads) * HEAD_DIM)
        want = torch.cat([q[:, rank * heads * HEAD_DIM:(rank + 1) * heads * HEAD_DIM], k[:, kv_cols], v[:, kv_cols]],
                         dim=-1)
        out[name] = (got(x), want)
    return {"outputs": {k: (a.float(), b.float()) for k, (a, b) in out.items()},
            "methods": {n: m.method.name for n, m in par.named_modules() if isinstance(m, LinearBase)},
            "ref_methods": {n: m.method.name for n, m in ref.named_modules() if isinstance(m, LinearBase)},
            "onednn": onednn_linear_available(),
            "embed_rows": tuple(par.embed.weight.shape), "tied": par.tied_head.weight is par.tied_embed.weight}


CASES = {"float32": (torch.float32, False), "bfloat16": (torch.bfloat16, False), "int8": (torch.float32, True)}


def _compare_cases_in_rank(model_dir) -> dict:
    return {case: _compare_in_rank(model_dir, dtype, int8) for case, (dtype, int8) in CASES.items()}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """{case: {rank: result}}, every case in the same 2 ranks."""
    model_dir = tmp_path_factory.mktemp("tp_layers")
    write_checkpoint(model_dir)
    by_rank = run_ranks(_compare_cases_in_rank, TP, model_dir)
    return {case: {rank: result[case] for rank, result in by_rank.items()} for case in CASES}


TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "int8": 2e-2}  # relative to the output's largest value
NAMES = ["col", "row", "mlp", "embed", "head", "tied_embed", "tied_head", *QKV_CASES, "fused"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_parallel_layer_equals_unsplit(rank_results, case, name):
    for rank, result in rank_results[case].items():
        got, want = result["outputs"][name]
        assert got.shape == want.shape, (rank, name)
        scale = want.abs().max().item()
        assert scale > 0.1
        assert (got - want).abs().max().item() <= TOLERANCE[case] * max(1.0, scale), (rank, name, case)


def test_shards_run_the_same_methods_as_unsplit_layers(rank_results):
    for case, by_rank in rank_results.items():
        for rank, result in by_rank.items():
            methods = result["methods"]
            assert methods == {n: result["ref_methods"][n] for n in methods}, (case, rank)
    fp32 = rank_results["float32"][0]
    assert fp32["methods"]["row"] == ("onednn" if fp32["onednn"] else "dense")
    assert rank_results["int8"][0]["methods"]["row"] == "int8"


def test_vocab_rows_are_padded_and_tied(rank_results):
    for rank, result in rank_results["float32"].items():
        assert result["embed_rows"] == (7, HIDDEN)  # ceil(13 / 2); rank 1's last row is padding
        assert result["tied"]


@pytest.mark.parametrize("heads, kv, tp, expected", [
    (4, 4, 2, (2, 2)), (4, 2, 2, (2, 1)), (8, 2, 4, (2, 1)), (8, 1, 4, (2, 1)), (8, 4, 2, (4, 2)),
])
def test_heads_per_rank(heads, kv, tp, expected):
    assert heads_per_rank(heads, kv, tp) == expected


@pytest.mark.parametrize("heads, kv, tp, message", [
    (6, 6, 4, "num_attention_heads 6 is not divisible by tensor_parallel_size 4"),
    (12, 6, 4, "num_key_value_heads 6 is not divisible by tensor_parallel_size 4"),
    (12, 3, 4, "num_key_value_heads 3 is fewer than tensor_parallel_size 4 and does not divide it"),
])
def test_heads_that_cannot_be_split_are_refused(heads, kv, tp, message):
    with pytest.raises(ValueError, match=message):
        heads_per_rank(heads, kv, tp)
