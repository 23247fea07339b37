"""Pipeline parallelism: which decoder layers a stage builds, and the activations passed between stages.

A model split in `pp_size` stages builds, on each rank, only its stage's part (vLLM's `get_pp_indices` /
`PPMissingLayer`): the first stage also the embeddings and the multimodal encoders and their merge, the last
stage also the final norm and `lm_head` (sampling happens there). Everything a stage does not build is a
`PPMissingLayer`, a module without parameters, in its place, so layer indices and parameter names stay the
checkpoint's (`layers.7` is still `layers.7` on the stage that owns it), and the loader skips exactly the
checkpoint tensors that fall under a missing module (`is_missing_weight`): a tensor nobody owns still fails.

Between stages travels a dict of named tensors (`IntermediateTensors`: the hidden state [num_tokens, hidden]
for OPT, Llama and Qwen2, whose layers keep no separate residual), sent with torch.distributed send/recv along
the rank's pipeline group. Every rank knows the step's token count from the scheduler output, so the receiver
allocates the shapes itself (`SupportsPP.intermediate_shapes`) and only the data crosses.

In a process that never called `init_parallel` there is one stage: everything is built, nothing is sent.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fovea.distributed import parallel_state as ps

IntermediateTensors = dict[str, torch.Tensor]


def get_pp_indices(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """[start, end) of the decoder layers stage `pp_rank` builds: contiguous and as even as possible, the
    remainder going to the stages before the last (which also runs the final norm, lm_head and sampling), as
    vLLM splits them."""
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp_size} is more than the language model's {num_layers} decoder "
                         f"layers: every stage needs at least one; use at most {num_layers}")
    sizes = [num_layers // pp_size] * pp_size
    for i in range(num_layers % pp_size):
        sizes[-2 - i] += 1
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


class PPMissingLayer(nn.Module):
    """What stands where this stage builds nothing (a decoder layer, the embeddings, lm_head, a vision tower)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module belongs to another pipeline stage")


def make_layers(num_layers: int, build) -> tuple[int, int, nn.ModuleList]:
    """This stage's decoder layers, `build(index)` for each, `PPMissingLayer` elsewhere; and [start, end)."""
    start, end = get_pp_indices(num_layers, ps.pp_rank(), ps.pp_size())
    layers = nn.ModuleList(build(i) if start <= i < end else PPMissingLayer() for i in range(num_layers))
    return start, end, layers


def first_stage_only(build):
    """`build()` on the first stage, else a PPMissingLayer."""
    return build() if ps.is_first_stage() else PPMissingLayer()


def last_stage_only(build):
    return build() if ps.is_last_stage() else PPMissingLayer()


def missing_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(name + "." for name, module in model.named_modules() if isinstance(module, PPMissingLayer))


def is_missing_weight(prefixes: tuple[str, ...], param_name: str) -> bool:
    """Whether a checkpoint tensor's fovea name falls under a module another stage owns."""
    return param_name.startswith(prefixes)


def tied_lm_head_name(name: str, is_tied: bool, embed_name: str) -> str | None:
    """Where a checkpoint tensor goes when lm_head may be tied to the token table. One stage: the file's
    `lm_head.weight` (if stored) is the same tensor as the table, skipped. Split: the last stage has lm_head
    but no table, so the table's tensor fills its lm_head (as vLLM loads a tied head on the last rank)."""
    if not is_tied:
        return name
    if name == "lm_head.weight":
        return None
    if name == embed_name and ps.pp_size() > 1 and ps.is_last_stage():
        return "lm_head.weight"
    return name


def send_to_next_stage(tensors: IntermediateTensors) -> None:
    layout = ps.layout()
    dst = layout.rank + layout.tp_size  # the same TP shard of the next stage
    for name in sorted(tensors):
        dist.send(tensors[name].contiguous(), dst=dst, group=ps.pp_group())


def recv_from_previous_stage(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> IntermediateTensors:
    layout = ps.layout()
    src = layout.rank - layout.tp_size
    out = {}
    for name in sorted(shapes):
        out[name] = torch.empty(shapes[name], dtype=dtype)
        dist.recv(out[name], src=src, group=ps.pp_group())
    return out
