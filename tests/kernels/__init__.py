import shutil

import pytest
import torch

from fovea.kernels.build import compiler

# The kernels' own tests need the extension; under the suite's "require" mode (tests/conftest.py) a build failure
# fails them. Without any compiler there is nothing to build.
requires_compiler = pytest.mark.skipif(shutil.which(compiler()) is None,
                                       reason="no C++ compiler on this host ($CXX, else c++)")

# the attention kernels' tests (encoder, causal prefill): their segments and their error scale
BF16_STEP = 2**-8  # a bfloat16 step relative to the value


def segment_offsets(lengths: list[int]) -> torch.Tensor:
    """cu_seqlens of segments of these lengths: [0, l0, l0 + l1, ...] int64."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


def linear_inputs(rows: int, k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bfloat16 linear layer's x [rows, k], W [n, k] (scaled by 1/sqrt(k)) and a float32 bias [n], seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).div(k ** 0.5).bfloat16()
    b = torch.randn(n, generator=g)
    return x, w, b
