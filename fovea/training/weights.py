"""Fill parts of a training model from a Hugging Face checkpoint directory, strictly, with fovea's loader.

Training models are assembled from pieces of other checkpoints: the frozen ViT of a BLIP-2 checkpoint, the
Q-Former of a stage-1 export, the OPT of a language-model directory. `load_parts` loads the tensors named
`<part>.*` into `model.<part>` for the parts asked for and ignores the rest of the file; within those parts
`fovea.models.weights.load_weights` is as strict as ever (every parameter filled, every tensor placed, shapes
exact), and each part's own hooks (OPT's packed qkv and tied head, BLIP's split qkv bias) still apply.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from fovea.models.weights import load_weights, safetensors_files


class _PartsView(nn.Module):
    """The chosen attributes of `model` under their own names (sharing the parameters), with the loader
    hooks of each part, so `load_weights` sees exactly those parameters."""

    def __init__(self, model: nn.Module, parts: Sequence[str], skip: Callable[[str], bool] | None):
        super().__init__()
        self._parts = list(parts)
        self._skip = skip
        self._renames: dict[str, Callable[[str], str | None]] = {}
        self.packed_modules_mapping: dict[str, list[str]] = {}
        for part in parts:
            value = getattr(model, part)
            if isinstance(value, nn.Parameter):
                self.register_parameter(part, value)
                continue
            self.add_module(part, value)
            for packed, shards in getattr(value, "packed_modules_mapping", {}).items():
                self.packed_modules_mapping.setdefault(packed, list(shards))
            if hasattr(value, "rename_checkpoint_weight"):
                self._renames[part] = value.rename_checkpoint_weight
        # BLIP vision attention: checkpoints before transformers 5 store q_bias and v_bias, not qkv.bias
        self.packed_modules_mapping.setdefault("qkv.bias", ["q_bias", "v_bias"])

    def rename_checkpoint_weight(self, name: str) -> str | None:
        part, _, rest = name.partition(".")
        if part not in self._parts or (self._skip is not None and self._skip(name)):
            return None
        if part in self._renames:
            inner = self._renames[part](rest)
            return None if inner is None else f"{part}.{inner}"
        return name


def load_parts(model: nn.Module, model_dir: str | Path, parts: Sequence[str],
               skip: Callable[[str], bool] | None = None) -> None:
    """Load `model.<part>` for every part from the tensors named `<part>.*` in `model_dir`.

    skip(name) -> True leaves a tensor of those parts unread (e.g. the text branch of a stage-1 Q-Former
    when the model being filled has none). Everything else is strict; see `load_weights`.
    """
    load_weights(_PartsView(model, parts, skip), model_dir)


def checkpoint_tensor_names(model_dir: str | Path) -> list[str]:
    names = []
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            names.extend(f.keys())
    return names


def is_qformer_text_branch(name: str) -> bool:
    """`qformer.encoder.layer.N.intermediate.*` / `.output.*`: the text feed-forward, which a query-only
    Q-Former (stage 2, `Blip2ForConditionalGeneration`) does not have."""
    parts = name.split(".")
    return (len(parts) > 4 and parts[:3] == ["qformer", "encoder", "layer"]
            and parts[4] in ("intermediate", "output"))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name (tied ones once), detached and contiguous: what a
    training checkpoint stores of the model (frozen parts are rebuilt from where they came from)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `trainable_state` back, exactly; a missing or extra name, or a shape change, is an error."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != state[name].shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(state[name].shape)}, model {tuple(param.shape)}")
            param.copy_(state[name])
