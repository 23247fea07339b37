import shutil

import pytest

from fovea.kernels.build import compiler

# The kernels' own tests need the extension; under the suite's "require" mode (tests/conftest.py) a build failure
# fails them. Without any compiler there is nothing to build.
requires_compiler = pytest.mark.skipif(shutil.which(compiler()) is None,
                                       reason="no C++ compiler on this host ($CXX, else c++)")
