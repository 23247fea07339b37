"""Suite-wide: fovea's C++ kernels run in "require" mode wherever a C++ compiler exists, so a kernel that no
longer compiles fails every test that uses it instead of letting it pass on the torch fallback. Set before each
test, because an engine a test starts applies its own `EngineConfig.cpu_kernels` (by default "auto") to the
whole process."""
import shutil

import pytest

from fovea import kernels
from fovea.kernels.build import compiler

HAS_COMPILER = shutil.which(compiler()) is not None
SUITE_MODE = "require" if HAS_COMPILER else "auto"


@pytest.fixture(autouse=True)
def _cpu_kernels_mode():
    kernels.set_mode(SUITE_MODE)
    yield
