"""The packed weight layout that fovea's AMX and AVX-512 BF16 linear kernels both read, so one packed copy serves
either kernel on a host that has both (`fovea.kernels.amx_linear`, `fovea.kernels.bf16_linear` say how each
kernel walks it).

W [N, K] is zero-padded to multiples of 32 and packed into [N'/32, K'/32, 2, 16, 16, 2]: for each 32-column
panel and each 32-wide step along K, two blocks of 16 columns, each in the pair-interleaved (VNNI) order: a
64-byte row holds the 16 columns' weights for one pair of k (k = 2r, 2r + 1). A panel is one contiguous run of
memory, which is what lets both kernels stream the weights at close to the memory's read bandwidth.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from fovea.kernels.ops import extension

BLOCK = 32
"""Columns per panel and k per step; the packed N and K are padded to multiples of this."""


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


VIRTIO_DEVICES = "/sys/bus/virtio/devices"
_VIRTIO_BALLOON = 5  # virtio device id of the memory balloon
_BALLOON_F_REPORTING = 5  # its feature bit: free page reporting


@functools.lru_cache(maxsize=4)
def host_reclaims_free_memory(devices: str = VIRTIO_DEVICES) -> bool:
    """Whether this machine is a VM whose host takes back the memory the guest frees: a virtio memory balloon that
    negotiated free page reporting (`devices`/*/device is 0x0005 and bit 5 of its `features` string, one character
    per bit from bit 0, is "1"). There the guest reports free blocks of 2 MiB and more, the host discards them, and
    the first write into such a block faults to the host: every fresh 2 MiB page costs that (measured here: 2.3-3
    CPU-s per GB), while 4 KiB pages mostly come from smaller free runs the host still backs (0.5-0.6 CPU-s per GB).
    False where there is no such device (bare metal, other hypervisors) or sysfs cannot be read."""
    for device in sorted(Path(devices).glob("*")):
        try:
            kind = int((device / "device").read_text().strip(), 16)
            features = (device / "features").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == _VIRTIO_BALLOON and len(features) > _BALLOON_F_REPORTING and features[_BALLOON_F_REPORTING] == "1":
            return True
    return False


def packed_shape(out_features: int, in_features: int) -> tuple[int, ...]:
    """The packed tensor's shape for a [out_features, in_features] weight."""
    return padded(out_features) // BLOCK, padded(in_features) // BLOCK, 2, 16, 16, 2


def empty_packed(out_features: int, in_features: int, dtype: torch.dtype, huge_pages: bool = True) -> torch.Tensor:
    """An unwritten [N'/32, K'/32, 2, 16, 16, 2] tensor for `pack_weight(..., out=)`, asked to live on 2 MiB pages
    (see `pack_weight`) before anything is written into it, unless `huge_pages` is False.

    Why not always: on a VM whose host takes free memory back (this project's machines: Firecracker with free
    page reporting of blocks of 2 MiB and more: `host_reclaims_free_memory`), a 2 MiB page always comes from such
    a block and its first write faults to the host (measured: ~2-3 CPU-s per GB written, against ~0.5 for 4 KiB
    pages taken from the smaller free runs the host still backs). An encoder runs its weights over hundreds of rows
    at once (compute-bound: ViT-g's fc1/fc2 at 257 rows ran as fast from 4 KiB pages), so its layers are always
    loaded with huge_pages=False; the language model's, which decode streams, per
    `fovea.models.weights.HUGE_PAGE_LAYERS` (`EngineConfig.huge_pages`)."""
    packed = torch.empty(packed_shape(out_features, in_features), dtype=dtype)
    module = extension()
    if module is not None and huge_pages:
        module.advise_huge_pages(packed)
    return packed


def pack_weight(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] -> [N'/32, K'/32, 2, 16, 16, 2] with N', K' the sizes padded to multiples of 32 with zeros:
    element [p, s, h, r, n, e] is W[32p + 16h + n, 32s + 2r + e] (zero past N or K).

    The packed tensor is asked to live on 2 MiB pages (Linux transparent huge pages, in "madvise" mode by
    default) before it is written: the kernels stream it, and with 4 KiB pages every 4 KiB costs a TLB walk and
    stops the hardware prefetcher (a `torch.sum` over 1 GB on the AMD EPYC, 1 thread: ~23 GB/s on 4 KiB pages,
    ~31 on 2 MiB); writing it then faults in 2 MiB at a time, not 4 KiB.

    `out`: write into these panels instead (e.g. a run of whole panels of a stacked weight's `empty_packed`
    tensor: a projection packed straight into its part of the stacked q/k/v, which is the stacked weight's
    packing wherever each projection but the last has a multiple of 32 rows).

    The copy is the extension's where it is built (`csrc/weight_pack.cpp`: whole k pairs, the panels split
    between the threads, read straight from `weight`, which at load is the checkpoint's mapped pages): torch's
    copy of the permuted view (`reference_pack`) moves one 2-byte element at a time, ~5x slower, and was most of
    loading's time (BLIP-2 OPT-2.7b). Both give the same bits."""
    n, k = weight.shape
    weight = weight.detach()
    if out is None and weight.device.type != "cpu":
        return reference_pack(weight)
    packed = empty_packed(n, k, weight.dtype) if out is None else out
    if tuple(packed.shape) != packed_shape(n, k) or packed.dtype != weight.dtype:
        raise ValueError(f"packed panels {list(packed.shape)} ({packed.dtype}) do not fit a {[n, k]} weight "
                         f"({weight.dtype})")
    module = extension()
    if module is None or weight.device.type != "cpu" or weight.element_size() != 2:
        return reference_pack(weight, out=packed)  # float32 and others (tests), or no extension: torch's copy
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    module.pack_panels_(packed, weight)
    return packed


def reference_pack(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`pack_weight`'s layout by torch's own ops (zero-padding, then a copy of the permuted view): the definition
    the extension's copy is tested against, and the path where the extension is not built."""
    n, k = weight.shape
    weight = weight.detach()
    if (n, k) != (padded(n), padded(k)):
        weight = F.pad(weight, (0, padded(k) - k, 0, padded(n) - n))
    n, k = weight.shape
    view = weight.reshape(n // BLOCK, 2, 16, k // BLOCK, 16, 2).permute(0, 3, 1, 4, 2, 5)
    return view.contiguous() if out is None else out.copy_(view)


def unpack_weight(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """`pack_weight`'s inverse: the dense W [out_features, in_features]."""
    num_panels, num_steps = packed.shape[:2]
    dense = packed.permute(0, 2, 4, 1, 3, 5).reshape(num_panels * BLOCK, num_steps * BLOCK)
    return dense[:out_features, :in_features].contiguous()
