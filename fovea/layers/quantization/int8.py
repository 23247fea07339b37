"""int8 linear methods: weights stored as int8 per output channel, y = (x @ q^T) * scale + b.

- `Int8LinearMethod` ("int8", `EngineConfig.quantization="int8"`): the checkpoint's dense weight is loaded as
  usual, then quantized once (`process_weights_after_loading`): symmetric per output channel, q in [-127, 127],
  scale = max|W[n, :]| / 127 rounded to the activation dtype, q = round(W / scale). Activations stay in the model
  dtype (W8A16).
- `CompressedInt8LinearMethod` ("int8-w8a16" / "int8-w8a8"): the int8 weight and its scales are read from a
  compressed-tensors checkpoint as they are (`fovea.layers.quantization.compressed_tensors`); W8A8 also
  quantizes each activation row dynamically (symmetric int8, scale = max|x| / 127.5, q in [-128, 127], as
  compressed-tensors' `forward_quantize` does) and multiplies int8 by int8 into int32 (`torch._int_mm`).

Both keep one int8 copy of the weight and `layer.int8_scale` [N] in the activation dtype, and release the
parameters they were loaded from (unless another module shares the dense weight, a tied `lm_head`). The copy
is in one of two layouts, chosen once at load (`store_int8_weight`):

- `layer.int8_packed` (`fovea.kernels.int8_linear.pack_weight`: 32-column panels, k in pairs, [P, K/2, 64] uint8
  sign-magnitude codes) for a weight-only layer with bfloat16 activations on a CPU where fovea's int8 kernel runs
  (AVX-512 BF16, `cpu_kernels` not "off"). Every matmul of such a layer, 1 row or thousands, runs that kernel:
  the int8 weight is read once per call as a stream (decode: close to the memory bandwidth) and widened to
  bfloat16 in registers and cache tiles, never dequantized in full (`fovea/kernels/int8_linear.py`).
- `layer.int8_packed` (`pack_weight_w8a8`: k in fours) and `layer.int8_compensation` for a W8A8 layer with
  float32 or bfloat16 activations where the kernels run: each row of x is quantized here
  (`quantize_activation_per_token`), and the kernel sums int8 x int8 exactly with VNNI and applies the scales
  with `int8_dynamic_linear`'s roundings: the same result, bit for bit, without torch's `_int_mm`.
- `layer.int8_weight` [N, K] int8 (contiguous) otherwise (weight-only float32 activations, no AVX-512 BF16 and
  VNNI, kernels off). A weight-only matmul (`int8_weight_only_linear`) then runs, up to `INT8_MM_MAX_ROWS` rows
  of bfloat16 (K a multiple of 16), torch's int8 weight-only CPU kernel (`aten._weight_int8pack_mm`); otherwise
  the weight is dequantized to the activation dtype and the dense GEMM runs. W8A8 runs `int8_dynamic_linear`.

A packed layer asked to run where the kernel no longer does (kernels turned off after loading) unpacks its
weight for that call: slow, never wrong.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fovea.kernels import int8_linear as int8_kernel
from fovea.layers.linear_methods import LinearMethod

INT8_MM_MAX_ROWS = 16
"""bfloat16 rows up to which `aten._weight_int8pack_mm` runs (measured on a busy 2-core AMD EPYC, Qwen2-0.5B's
896 x 4864: 0.28 ms vs 0.44 ms for bfloat16 F.linear at 1 row, even at 8, 1.5x slower at 64). float32 never
takes it (10-50x slower than dequantize + GEMM)."""

INT8_MM_K_MULTIPLE = 16
"""`aten._weight_int8pack_mm` (torch 2.13, CPU) crashes the process (a segmentation fault, not an error) when K is
not a multiple of 16 (found with K = 97, 99, 100, 104); such layers dequantize instead."""

ACTIVATION_QMAX = 127.5
"""compressed-tensors' symmetric int8 scale divisor: its range [-128, 127] is 255 wide, halved."""


def quantize_weight_per_channel(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] int8 in [-127, 127], scale [N] in `scale_dtype`), symmetric per output row.

    The scale is rounded to `scale_dtype` before dividing, so q * scale is the nearest point the kernel can
    reproduce; an all-zero row gets scale 1 (its q is 0 either way)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax)).to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_activation_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] int8, scale [M, 1] in x.dtype): compressed-tensors' dynamic symmetric per-token
    quantization, step for step in x's dtype (scale = max|x| / 127.5, 0 -> eps; round half to even; clamp)."""
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = absmax / torch.tensor(ACTIVATION_QMAX, dtype=x.dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(x.dtype).eps, dtype=x.dtype), scale)
    q = torch.round(x / scale).clamp_(-128, 127).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] int8 and [N] scales -> [N, K] in `dtype` (each product rounded once)."""
    return q.to(dtype) * scale.to(dtype)[:, None]


def int8_weight_only_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (float) @ (q * scale)^T + bias -> [..., N] in x.dtype; `scale` [N] in x.dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if (x.dtype == torch.bfloat16 and x2.shape[0] <= INT8_MM_MAX_ROWS and x.device.type == "cpu"
            and x2.shape[1] % INT8_MM_K_MULTIPLE == 0):
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale)
        if bias is not None:
            y = y + bias
    else:
        y = F.linear(x2, dequantize_weight(q, scale, x.dtype), bias)
    return y.view(*x.shape[:-1], q.shape[0])


def int8_dynamic_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8: each row of x quantized to int8 (`quantize_activation_per_token`), int8 x int8 -> int32 exactly,
    then y = acc * x_scale * w_scale (in float32, rounded once to x.dtype) + bias."""
    x2 = x.reshape(-1, x.shape[-1])
    qx, x_scale = quantize_activation_per_token(x2)
    acc = torch._int_mm(qx, q.t())  # (M, N) int32: |acc| <= K * 128 * 128 < 2^31 for K < 131072
    y = (acc.float() * x_scale.float() * scale.float()).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], q.shape[0])


def store_int8_weight(layer: nn.Module, q: torch.Tensor, scale: torch.Tensor, is_weight_only: bool) -> None:
    """Keep q [N, K] int8 in the one layout `apply` reads (see the module docstring), and the scale [N]."""
    runs_kernel = q.device.type == "cpu" and int8_kernel.available()
    if is_weight_only and runs_kernel and layer.params_dtype == torch.bfloat16:
        layer.int8_packed = int8_kernel.pack_weight(q, huge_pages=layer.huge_pages)
    elif not is_weight_only and runs_kernel and layer.params_dtype in (torch.float32, torch.bfloat16):
        layer.int8_packed, layer.int8_compensation = int8_kernel.pack_weight_w8a8(q, huge_pages=layer.huge_pages)
    else:
        layer.int8_weight = q.contiguous()
    layer.int8_scale = scale
    if hasattr(layer, "int8_packed"):
        # what the kernels read (float32): converted once here rather than in every call (a decode step calls
        # each layer once; the conversion, an allocation and a copy, was a few microseconds of every call: the
        # bfloat16 bias 1.2 of a 3.0 us call, 1 row, 1 thread, AMD EPYC)
        layer.int8_scale_f32 = scale.float().contiguous()
        bias = getattr(layer, "bias", None)
        layer.int8_bias_f32 = None if bias is None else bias.detach().float().contiguous()


def int8_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's int8 weight [N, K], whichever layout holds it."""
    packed = getattr(layer, "int8_packed", None)
    if packed is None:
        return layer.int8_weight
    unpack = int8_kernel.unpack_weight if packed.dim() == 3 else int8_kernel.unpack_weight_w8a8
    return unpack(packed, layer.out_features, layer.in_features)


def describe_int8(method: LinearMethod, layer: nn.Module) -> str:
    """`int8[fovea-avx512bf16]`, `int8-w8a8[fovea-vnni]` or `...[torch]`: the layout chosen at load says which
    kernel runs."""
    packed = getattr(layer, "int8_packed", None)
    kernel = "torch" if packed is None else "fovea-avx512bf16" if packed.dim() == 3 else "fovea-vnni"
    return f"{method.name}[{kernel}]"


def _runs_kernel(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and int8_kernel.available()


def apply_weight_only(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    packed = getattr(layer, "int8_packed", None)
    if packed is None:
        return int8_weight_only_linear(x, layer.int8_weight, layer.int8_scale, layer.bias)
    if x.dtype == torch.bfloat16 and _runs_kernel(x):
        return int8_kernel.linear(x, packed, layer.out_features, layer.int8_scale_f32, layer.int8_bias_f32)
    return int8_weight_only_linear(x, int8_weight(layer), layer.int8_scale, layer.bias)


def apply_dynamic(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    packed = getattr(layer, "int8_packed", None)
    if packed is None:
        return int8_dynamic_linear(x, layer.int8_weight, layer.int8_scale, layer.bias)
    if x.dtype in (torch.float32, torch.bfloat16) and _runs_kernel(x):
        x2 = x.reshape(-1, x.shape[-1])
        qx, x_scale = quantize_activation_per_token(x2)
        y = int8_kernel.dynamic_linear(qx, x_scale, packed, layer.int8_compensation, layer.out_features,
                                       layer.int8_scale_f32, layer.int8_bias_f32, x.dtype)
        return y.view(*x.shape[:-1], layer.out_features)
    return int8_dynamic_linear(x, int8_weight(layer), layer.int8_scale, layer.bias)


class Int8LinearMethod(LinearMethod):
    """Quantizes a loaded dense weight to int8 per output channel (W8A16). Built with the dense weights (the
    checkpoint's), so loading is unchanged; `state_dict()` then gives the dequantized weight (q * scale)."""

    name = "int8"

    def process_weights_after_loading(self, layer: nn.Module, keep_weight: bool = False) -> None:
        q, scale = quantize_weight_per_channel(layer.weight, layer.params_dtype)
        store_int8_weight(layer, q, scale, is_weight_only=True)
        if not keep_weight:
            del layer.weight

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return apply_weight_only(layer, x)

    def describe(self, layer: nn.Module) -> str:
        return describe_int8(self, layer)

    def checkpoint_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        tensors = super().checkpoint_tensors(layer)
        if "weight" not in tensors:
            tensors = {"weight": dequantize_weight(int8_weight(layer), layer.int8_scale, layer.params_dtype),
                       **tensors}
        return tensors


class CompressedInt8LinearMethod(LinearMethod):
    """int8 weights as a compressed-tensors checkpoint stores them, per output channel, symmetric:
    `weight` [N, K] int8 ("int-quantized" / "naive-quantized") or `weight_packed` [N, K / 4] int32 with
    `weight_shape` [2] ("pack-quantized": four int8 values + 128 per little-endian word), and `weight_scale`
    [N, 1]. `is_dynamic_activation`: W8A8 (activations quantized per token at run time), else W8A16."""

    def __init__(self, is_packed: bool, is_dynamic_activation: bool):
        self.is_packed = is_packed
        self.is_dynamic_activation = is_dynamic_activation
        self.name = "int8-w8a8" if is_dynamic_activation else "int8-w8a16"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool,
                       dtype: torch.dtype | None, initialize: bool) -> None:
        if self.is_packed:
            if in_features % 4:
                raise ValueError(f"pack-quantized int8 needs in_features divisible by 4, got {in_features}")
            layer.weight_packed = nn.Parameter(torch.empty(out_features, in_features // 4, dtype=torch.int32),
                                               requires_grad=False)
            layer.weight_shape = nn.Parameter(torch.tensor([out_features, in_features]), requires_grad=False)
        else:
            layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        # float32 while loading whatever the checkpoint's scale dtype; rounded to the activation dtype after
        layer.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32), requires_grad=False)
        layer.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def process_weights_after_loading(self, layer: nn.Module, keep_weight: bool = False) -> None:
        if self.is_packed:
            q = unpack_int8_from_int32(layer.weight_packed.data, layer.in_features)
            del layer.weight_packed, layer.weight_shape
        else:
            q = layer.weight.data
            del layer.weight
        scale = layer.weight_scale.data.view(-1).to(layer.params_dtype)
        del layer.weight_scale
        store_int8_weight(layer, q, scale, is_weight_only=not self.is_dynamic_activation)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.is_dynamic_activation:
            return apply_dynamic(layer, x)
        return apply_weight_only(layer, x)

    def describe(self, layer: nn.Module) -> str:
        return describe_int8(self, layer)

    def checkpoint_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """As an "int-quantized" checkpoint holds them (a pack-quantized one saves unpacked)."""
        tensors = {"weight": int8_weight(layer), "weight_scale": layer.int8_scale.view(-1, 1)}
        return {**tensors, **super().checkpoint_tensors(layer)}


def unpack_int8_from_int32(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """compressed-tensors' 8-bit "pack-quantized" layout: element k of a row is byte k % 4 (least significant
    first) of word k // 4, stored as value + 128. [N, K / 4] int32 -> [N, K] int8."""
    as_bytes = packed.contiguous().view(torch.uint8)  # little-endian: byte j of a word is bits 8j..8j+7
    if torch.tensor([1], dtype=torch.int32).view(torch.uint8)[0] != 1:
        as_bytes = as_bytes.view(packed.shape[0], -1, 4).flip(-1).reshape(packed.shape[0], -1)
    return (as_bytes[:, :in_features].to(torch.int16) - 128).to(torch.int8)
