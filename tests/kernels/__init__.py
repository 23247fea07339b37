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
