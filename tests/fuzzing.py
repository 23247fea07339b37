"""Property tests in two sizes: a few derandomized examples in `make test`, many random ones in `make test-slow`.

    @fuzz(40, data=st.binary(max_size=4096))
    def test_random_bytes_are_a_value_error(data, tmp_path):  # fixtures may follow the drawn arguments
        ...

runs as `test_random_bytes_are_a_value_error[ci]` (40 examples, the same ones on every run: `derandomize`, so a
failure in CI is a failure on every machine) and `test_..._[slow]` (`SLOW_FACTOR` times as many, random each run,
marked slow). `FOVEA_FUZZ_EXAMPLES=<factor>` multiplies the slow count further, for a long hunt:

    FOVEA_FUZZ_EXAMPLES=10 .venv/bin/python -m pytest -q -m slow tests -k properties

Hypothesis' example database is off in both: a test's result depends on its code only. `test.property(profile,
**fixtures)` runs one outside pytest (e.g. to count `hypothesis.event`s while tuning its strategies).
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings

SLOW_FACTOR = 25
PROFILES = [pytest.param("ci", id="ci"), pytest.param("slow", id="slow", marks=pytest.mark.slow)]
_HEALTH_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                  HealthCheck.function_scoped_fixture]


def fuzz_settings(profile: str, num_examples: int) -> settings:
    """The settings of `profile` ("ci" or "slow") for a test that runs `num_examples` in CI."""
    if profile == "ci":
        return settings(max_examples=num_examples, derandomize=True, database=None, deadline=None,
                        suppress_health_check=_HEALTH_CHECKS, print_blob=True)
    factor = SLOW_FACTOR * int(os.environ.get("FOVEA_FUZZ_EXAMPLES", "1"))
    return settings(max_examples=num_examples * factor, database=None, deadline=None,
                    suppress_health_check=_HEALTH_CHECKS, print_blob=True)


def fuzz(num_examples: int, **strategies: Any) -> Callable:
    """`given(**strategies)` under both profiles (see the module's docstring); other arguments are fixtures."""

    def decorate(test: Callable) -> Callable:
        fixtures = [p for name, p in inspect.signature(test).parameters.items() if name not in strategies]

        @pytest.mark.parametrize("fuzz_profile", PROFILES)
        def run(fuzz_profile: str, **fixture_values: Any) -> None:
            # a fresh given per profile: hypothesis allows one settings object per decorated function
            fuzz_settings(fuzz_profile, num_examples)(given(**strategies)(test))(**fixture_values)

        run.__signature__ = inspect.Signature(
            [inspect.Parameter("fuzz_profile", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in fixtures])
        run.__name__, run.__qualname__, run.__doc__ = test.__name__, test.__qualname__, test.__doc__
        run.__module__ = test.__module__
        run.property = lambda profile="ci", **kw: fuzz_settings(profile, num_examples)(given(**strategies)(test))(**kw)
        return run

    return decorate
