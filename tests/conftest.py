"""Suite-wide: fovea's C++ kernels run in "require" mode wherever a C++ compiler exists, so a kernel that no
longer compiles fails every test that uses it instead of letting it pass on the torch fallback. Set before each
test, because an engine a test starts applies its own `EngineConfig.cpu_kernels` (by default "auto") to the
whole process. The packed weights cache goes to a temporary directory of the run's own (FOVEA_CACHE_DIR)."""
import atexit
import os
import shutil
import tempfile

import pytest

from fovea import kernels
from fovea.kernels.build import compiler

# the packed weights cache (`fovea.models.packed_cache`, on by default) of every test and the processes it starts
# lives in a directory of the run's own, never in the user's ~/.cache
_CACHE_DIR = tempfile.mkdtemp(prefix="fovea-test-cache-")
os.environ["FOVEA_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

HAS_COMPILER = shutil.which(compiler()) is not None
SUITE_MODE = "require" if HAS_COMPILER else "auto"


@pytest.fixture(autouse=True)
def _cpu_kernels_mode():
    kernels.set_mode(SUITE_MODE)
    yield
