"""compressed-tensors int8 checkpoints made by the `compressed-tensors` package itself (what llm-compressor
calls to save), from the tiny random transformers checkpoints of `tests.oracle`.

`quantize_checkpoint` applies a W8A16 or W8A8 scheme to the transformers model of `src_dir`, sets each weight's
per-channel scale as an observer would (`calculate_qparams` of the row's min and max), compresses and saves to
`out_dir` with `quantization_config` in config.json; tokenizer and processor files are copied. transformers
loads the result as the reference: weights dequantized, activations fake-quantized per token
(`forward_quantize`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from compressed_tensors.quantization.utils import calculate_qparams

WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
TOKEN_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def quantize_checkpoint(src_dir: str | Path, out_dir: str | Path, scheme: str, ignore: list[str],
                        format: str | None = None, weights: dict | None = None) -> Path:
    """scheme "w8a16" (weights only) or "w8a8" (dynamic per-token activations); `format` forces a compression
    format (default: what compressed-tensors infers, "pack-quantized" for W8A16, "int-quantized" for W8A8)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    architecture = json.loads((src_dir / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(src_dir, dtype=torch.float32).eval()
    config = QuantizationConfig.model_validate({
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights or WEIGHTS,
                                      "input_activations": TOKEN_ACTIVATIONS if scheme == "w8a8" else None}},
        "ignore": ignore, "quantization_status": "frozen"})
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "quantization_scheme", None) is None:
                continue
            w, args = module.weight, module.quantization_scheme.weights
            if args.strategy != "channel":  # other strategies only make checkpoints fovea must refuse
                module.weight_scale.fill_(0.01)
                continue
            scale, zero_point = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
            module.weight_scale.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=format)
    compressor.compress_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    compressor.update_config(str(out_dir))
    for path in src_dir.iterdir():
        if path.is_file() and not (out_dir / path.name).exists():
            shutil.copy(path, out_dir / path.name)
    return out_dir


def token_rows_for_2d_inputs(model: torch.nn.Module) -> None:
    """Make compressed-tensors' per-token activation quantization per row for every linear layer of `model`.

    Its "token" strategy keeps dims 0 and 1 of the input and takes the max over the rest: per token for the
    [B, T, K] inputs most layers get, but one scale PER ELEMENT for a 2-D [T, K] input (nothing is reduced),
    which is what transformers' OPT gives fc1 and fc2 (it flattens the MLP input). The hooks run those layers on
    [1, T, K] instead, so the reference quantizes per token as the scheme says (and as vLLM's kernels do)."""
    def to_3d(module, args):
        module.is_input_2d = args[0].dim() == 2
        return (args[0].unsqueeze(0),) + args[1:] if module.is_input_2d else None

    def back_to_2d(module, args, output):
        return output.squeeze(0) if module.is_input_2d else None

    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            module.register_forward_pre_hook(to_3d)
            module.register_forward_hook(back_to_2d)
