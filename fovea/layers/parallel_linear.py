"""Tensor-parallel linear layers (Megatron-LM's split, as vLLM has it): each rank holds a slice of the
checkpoint's weight and runs its own linear method on it.

- `ColumnParallelLinear`: output features split, rank r holds rows [r * out/tp, (r+1) * out/tp) of W and b;
  its output [..., out/tp] stays on the rank (the next layer reads the slice: no communication).
- `MergedColumnParallelLinear` (gate, up -> gate_up_proj) and `QKVParallelLinear` (q, k, v -> qkv_proj):
  a `PackedLinear` whose every shard is split, so the rank's output is [its gate | its up] or [its q | its k |
  its v], laid out as the unsplit layer's and cut by `split`. q is split by heads; k and v by KV heads, or,
  with fewer KV heads than ranks (GQA), each rank holds the one KV head its q heads read (replicated on
  tp / num_kv_heads ranks, as vLLM does).
- `RowParallelLinear`: input features split, rank r holds columns [r * in/tp, (r+1) * in/tp) of W; the ranks'
  partial products are summed by one `tp_all_reduce`. The bias is added once: rank 0 holds it, the other ranks
  hold zeros (so every rank's layer has the same parameters and methods, packed ones included, run unchanged).

A rank's weight loader narrows the checkpoint tensor (a view of the memory-mapped file) to its slice and copies
only that: rows for a column split (contiguous pages), columns for a row split. The linear method (dense,
oneDNN-packed, AVX-512 BF16, AMX, int8) is chosen and packs after loading, on the slice, as for any layer. A stacked
layer running in place (`fovea.layers.linear_methods.BF16RowsLinearMethod`) keeps each projection's row slice as a
view of the file (`PackedLinear._load_shard`); the plain column- and row-parallel layers copy their slice and run
it from that copy (keeping a column range in place would need no more than the kernel's row stride, but each rank
would then map every page of the tensor: not done).

At TP=1 (a process that never called `init_parallel`) each class is the plain layer: no loader is set where the
plain one has none (the loader may lend the file's pages), and `tp_all_reduce` returns its input untouched.
"""
from __future__ import annotations

import torch
from torch import nn

from fovea.distributed import parallel_state as ps
from fovea.layers.linear import LinearBase, PackedLinear, copy_checked, set_weight_loader


def split_evenly(size: int, what: str, tp_size: int) -> int:
    """size / tp_size, or a ValueError naming `what` when the ranks cannot share it evenly."""
    if size % tp_size:
        raise ValueError(f"{what} {size} is not divisible by tensor_parallel_size {tp_size}")
    return size // tp_size


def _check_rows(loaded: torch.Tensor, rows: int, dim: int) -> None:
    if loaded.dim() <= dim or loaded.shape[dim] != rows:
        raise ValueError(f"shape {tuple(loaded.shape)}: expected {rows} along dim {dim} before the "
                         f"tensor-parallel split")


class ColumnParallelLinear(LinearBase):
    """y_rank = x @ W_rank^T + b_rank, [..., out_features / tp]; `full_out_features` is the checkpoint's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None):
        self.tp_size, self.tp_rank = ps.tp_size(), ps.tp_rank()
        self.full_out_features = out_features
        super().__init__(in_features, split_evenly(out_features, "output features", self.tp_size), bias=bias,
                         dtype=dtype)
        if self.tp_size > 1:
            for param in self.parameters():
                set_weight_loader(param, self._load_rows, ())

    def _load_rows(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        if shard_id is not None:
            raise ValueError(f"parameter is not packed, but got shard {shard_id!r}")
        _check_rows(loaded, self.full_out_features, 0)
        copy_checked(param.data, loaded.narrow(0, self.tp_rank * self.out_features, self.out_features))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tp={self.tp_rank}/{self.tp_size}"


class RowParallelLinear(LinearBase):
    """y = sum over ranks of x_rank @ W_rank^T, + b once; x_rank [..., in_features / tp] is the rank's slice of
    the input (a column-parallel layer's output, or its attention heads')."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None):
        self.tp_size, self.tp_rank = ps.tp_size(), ps.tp_rank()
        self.full_in_features = in_features
        super().__init__(split_evenly(in_features, "input features", self.tp_size), out_features, bias=bias,
                         dtype=dtype)
        if self.tp_size > 1:
            set_weight_loader(self.weight, self._load_columns, ())
            if self.bias is not None:
                set_weight_loader(self.bias, self._load_bias, ())

    def _load_columns(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        if shard_id is not None:
            raise ValueError(f"parameter is not packed, but got shard {shard_id!r}")
        _check_rows(loaded, self.full_in_features, 1)
        copy_checked(param.data, loaded.narrow(1, self.tp_rank * self.in_features, self.in_features))

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        if shard_id is not None:
            raise ValueError(f"parameter is not packed, but got shard {shard_id!r}")
        copy_checked(param.data, loaded if self.tp_rank == 0 else torch.zeros_like(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        if self.tp_size == 1:
            return y
        return ps.tp_all_reduce(y.contiguous())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tp={self.tp_rank}/{self.tp_size}"


class ColumnParallelPackedLinear(PackedLinear):
    """A `PackedLinear` whose shards are each sliced for the rank: `checkpoint_sizes` are the checkpoint's
    shard sizes (output rows), `rank_slices` the (first row, rows) of each that this rank holds."""

    def __init__(self, in_features: int, checkpoint_sizes: dict[str, int], rank_slices: dict[str, tuple[int, int]],
                 bias: bool = True, dtype: torch.dtype | None = None):
        self.tp_size, self.tp_rank = ps.tp_size(), ps.tp_rank()
        self.checkpoint_sizes = dict(checkpoint_sizes)
        self.rank_slices = dict(rank_slices)
        super().__init__(in_features, {name: rows for name, (_, rows) in self.rank_slices.items()}, bias=bias,
                         dtype=dtype)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        if self.tp_size == 1:
            return super()._load_shard(param, loaded, shard_id)
        if shard_id is None:  # a checkpoint holding the stacked tensor: cut it into its shards first
            _check_rows(loaded, sum(self.checkpoint_sizes.values()), 0)
            offset = 0
            for name, rows in self.checkpoint_sizes.items():
                self._load_shard(param, loaded.narrow(0, offset, rows), name)
                offset += rows
            return
        if shard_id not in self.rank_slices:
            raise ValueError(f"no shard {shard_id!r} in a layer packing {list(self.rank_slices)}")
        _check_rows(loaded, self.checkpoint_sizes[shard_id], 0)
        first, rows = self.rank_slices[shard_id]
        super()._load_shard(param, loaded.narrow(0, first, rows), shard_id)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tp={self.tp_rank}/{self.tp_size}"


class MergedColumnParallelLinear(ColumnParallelPackedLinear):
    """Projections of one input stacked (gate, up -> gate_up_proj), each split evenly over the ranks."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = True,
                 dtype: torch.dtype | None = None):
        tp_size, tp_rank = ps.tp_size(), ps.tp_rank()
        slices = {}
        for name, size in shard_sizes.items():
            rows = split_evenly(size, f"{name} output features", tp_size)
            slices[name] = (tp_rank * rows, rows)
        super().__init__(in_features, shard_sizes, slices, bias=bias, dtype=dtype)


def heads_per_rank(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(query heads, KV heads) one rank of `tp_size` runs. KV heads are split when there are at least as many
    as ranks, else replicated: each rank keeps one, the one its query heads share."""
    if num_heads % tp_size:
        raise ValueError(f"num_attention_heads {num_heads} is not divisible by tensor_parallel_size {tp_size}")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"num_key_value_heads {num_kv_heads} is not divisible by tensor_parallel_size "
                             f"{tp_size}")
        return num_heads // tp_size, num_kv_heads // tp_size
    if tp_size % num_kv_heads:
        raise ValueError(f"num_key_value_heads {num_kv_heads} is fewer than tensor_parallel_size {tp_size} and "
                         f"does not divide it, so the KV heads cannot be replicated evenly over the ranks")
    return num_heads // tp_size, 1


class QKVParallelLinear(ColumnParallelPackedLinear):
    """q, k, v -> qkv_proj, split by heads. `num_heads` / `num_kv_heads` are this rank's (what its `Attention`
    runs); the KV head rank r holds is r * num_kv_heads // tp when they are replicated."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = True,
                 dtype: torch.dtype | None = None, names: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")):
        tp_size, tp_rank = ps.tp_size(), ps.tp_rank()
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads, self.num_kv_heads = heads_per_rank(num_heads, num_kv_heads, tp_size)
        self.head_dim = head_dim
        first_kv_head = (tp_rank * self.num_kv_heads if num_kv_heads >= tp_size
                         else tp_rank * num_kv_heads // tp_size)
        q_name, k_name, v_name = names
        q_rows, kv_rows = self.num_heads * head_dim, self.num_kv_heads * head_dim
        sizes = {q_name: num_heads * head_dim, k_name: num_kv_heads * head_dim, v_name: num_kv_heads * head_dim}
        slices = {q_name: (tp_rank * q_rows, q_rows), k_name: (first_kv_head * head_dim, kv_rows),
                  v_name: (first_kv_head * head_dim, kv_rows)}
        super().__init__(hidden_size, sizes, slices, bias=bias, dtype=dtype)
