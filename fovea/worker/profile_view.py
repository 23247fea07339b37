"""A view of a model for the memory profiling pass: every stack of like layers cut to its first and last layer.

Why: the profiling pass runs a worst-case step (the encoder on its worst-case items, then `max_num_batched_tokens`
through the language model) to measure the activations' peak, and run whole it reads every weight: on BLIP-2
OPT-2.7b, ViT-g and the Q-Former on the worst-case image and then the 5.3 GB language model, about as long as
loading the weights. But a stack of layers frees each layer's temporaries before the next layer runs, and hands on
a hidden state of the same shape, so the step's peak is reached inside one layer, on top of what persists across
the stack (the embeddings, the hidden state and residual, the encoder's outputs, the logits rows). Running only
the first and the last layer of each kind in each stack measures that peak while reading ~2/L of the weights.
Layers of one stack are not always alike: the Q-Former cross-attends in every other layer (two kinds by their
parameters: each keeps its first and last), and some differ only in what their stack's forward makes them run:
Qwen2.5-VL's vision blocks attend over whole frames only at `fullatt_block_indexes` (its last block is one), a
Llama's last layer prunes the rows whose logits are not taken; hence the last as well as the first.

What the view leaves out: the KV entries the skipped layers would write (the KV cache's own budget, not the
step's: the profiling pass keeps the KV pages it writes out of its reading, `ModelRunner.profile_peak_bytes`),
and memory a real run might fragment across many layers (the margin, `PROFILE_VIEW_MARGIN`, measured against the
whole step in tests/worker/test_memory_profile.py).

A skipped layer stays in its place (indices, pipeline-stage slices and `layers[-1]` keep their meaning) as a
`SkippedLayer` that hands its inputs on in the shape its stack's layers return: the hidden state alone, or the
(hidden state, residual) pair, as the first kept layer returned.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from fovea.distributed.pipeline import PPMissingLayer

MIN_STACK_LAYERS = 3
"""Stacks of fewer layers run whole (cutting them would save nothing)."""

PROFILE_VIEW_MARGIN = 1.5
"""The view's reading is raised by this factor: the allocator's state after two layers and after many differs
(freed blocks kept, fragmentation), and a reading varies from one fresh process to the next. Measured at 4096
tokens (tests/worker/test_memory_profile.py, five fresh-process pairs each): tiny BLIP-2 (bfloat16, 6 layers a
stack), whole step 23.9-30.0 MB, the view 24.0-26.2 MB; tiny Llama (float32), whole 41.7-42.2 MB, the view
37.0-39.0 MB. So the view reads 0.8-1.1x the whole step, and with this margin 1.2-1.6x: activations are a small
part of the KV budget, so the KV cache gives up little to be safe."""


class SkippedLayer(nn.Module):
    """A layer the profiling view leaves out: returns its first input (a stack of layers returning one tensor) or
    its first `arity` inputs (layers taking and returning `(x, residual)`), as `StackShape` recorded from the
    first kept layer's output."""

    def __init__(self, shape: "StackShape"):
        super().__init__()
        self.shape = shape

    def forward(self, *args, **kwargs):
        arity = self.shape.arity
        if arity is None or len(args) < max(arity, 1):
            raise RuntimeError(f"profiling view: a skipped layer got {len(args)} positional inputs before its "
                               f"stack's first kept layer said what it returns (arity {arity})")
        return args[0] if arity == 0 else tuple(args[:arity])


class StackShape:
    """What the layers of one stack return: 0 = one tensor, n = a tuple of n (None until the first kept layer
    ran)."""

    def __init__(self):
        self.arity: int | None = None

    def record(self, module: nn.Module, args, output) -> None:
        self.arity = len(output) if isinstance(output, tuple) else 0


def _signature(layer: nn.Module) -> tuple:
    return type(layer), tuple((name, tuple(p.shape)) for name, p in layer.named_parameters())


def layer_stacks(model: nn.Module) -> list[tuple[nn.ModuleList, list[int], list[int]]]:
    """Each `nn.ModuleList` of `model` holding at least `MIN_STACK_LAYERS` layers of one class (a pipeline stage's
    `PPMissingLayer`s aside), with the indices of the layers the view keeps and of those it skips: the first and
    the last of each kind (a kind: the same parameter names and shapes; the Q-Former's cross-attending layers are
    one kind, the others another; T5's sub-layers are all different, so none is skipped)."""
    stacks = []
    for module in model.modules():
        if not isinstance(module, nn.ModuleList):
            continue
        real = [i for i, layer in enumerate(module) if not isinstance(layer, PPMissingLayer)]
        if len(real) < MIN_STACK_LAYERS or len({type(module[i]) for i in real}) != 1:
            continue
        kinds: dict[tuple, list[int]] = {}
        for i in real:
            kinds.setdefault(_signature(module[i]), []).append(i)
        kept = sorted({i for indices in kinds.values() for i in (indices[0], indices[-1])})
        skipped = [i for i in real if i not in kept]
        if skipped:
            stacks.append((module, kept, skipped))
    return stacks


@contextlib.contextmanager
def profile_view(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Within: each stack of `model` (`layer_stacks`) runs its first and last layer only. Yields the layers left
    out (their modules are back in place on exit)."""
    saved: list[tuple[nn.ModuleList, int, nn.Module]] = []
    hooks = []
    try:
        for stack, kept, skipped in layer_stacks(model):
            shape = StackShape()
            hooks.append(stack[kept[0]].register_forward_hook(shape.record))
            for i in skipped:
                saved.append((stack, i, stack[i]))
                stack[i] = SkippedLayer(shape)
        yield [layer for _, _, layer in saved]
    finally:
        for hook in hooks:
            hook.remove()
        for stack, i, layer in saved:
            stack[i] = layer
