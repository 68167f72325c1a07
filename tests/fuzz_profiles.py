"""Budgets for the fuzz tests (tests/unit/streaming/test_fuzz.py), chosen by the environment variable CXR_FUZZ_PROFILE.

* ``ci`` (the default): a few hundred inputs per property, the same ones on every run (``derandomize``), so CI
  stays fast and a red build is reproducible; the whole fuzz file runs in well under a minute on two cores.
* ``long``: fresh random inputs, enough that all properties together run more than 100,000 of them. Run it
  before a release or after touching a decoder or the parser, e.g. on one core in the background::

      CXR_FUZZ_PROFILE=long nice .venv/bin/pytest tests/unit/streaming/test_fuzz.py \\
          -p no:cacheprovider --hypothesis-show-statistics -q

  ``--hypothesis-show-statistics`` prints how many inputs each property ran. A failure prints the smallest
  input found and a ``@reproduce_failure`` blob; add the input as an ``@example`` next to the fix.

Neither profile keeps an example database (Hypothesis still caches a little under ``.hypothesis/``, which
.gitignore ignores). A test takes `fuzz_settings(ci=..., long=...)` as a decorator and `fuzz_timeout()` as its
pytest-timeout mark.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, settings

PROFILE_VARIABLE = "CXR_FUZZ_PROFILE"


@dataclass(frozen=True)
class FuzzProfile:
    """How to fuzz; how much is each property's own `ci` or `long` count (see `fuzz_settings`)."""

    name: str
    derandomize: bool
    #: seconds a whole fuzz test may take before pytest-timeout kills it as hung (one input is milliseconds)
    timeout_s: float


PROFILES = {
    "ci": FuzzProfile("ci", derandomize=True, timeout_s=120),
    "long": FuzzProfile("long", derandomize=False, timeout_s=3 * 3600),
}


def active_profile() -> FuzzProfile:
    name = os.environ.get(PROFILE_VARIABLE, "ci").strip().lower() or "ci"
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"{PROFILE_VARIABLE} must be one of {sorted(PROFILES)}, not {name!r}") from None


def fuzz_settings(*, ci: int, long: int) -> settings:
    """Hypothesis settings for one property: `ci` or `long` examples, per the active profile.

    No deadline (a slow input on a loaded CI machine is not a bug; a hung one is caught by `fuzz_timeout`),
    no example database, and the health checks that only complain about big generated inputs are off: big
    inputs are the point here.
    """
    profile = active_profile()
    return settings(
        max_examples=ci if profile.name == "ci" else long,
        deadline=None,
        database=None,
        derandomize=profile.derandomize,
        print_blob=True,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


def fuzz_timeout() -> pytest.MarkDecorator:
    """A per-test hang guard. The thread method also ends a hang inside C code (a decoder loop), which a
    signal cannot interrupt; it dumps every thread's stack and exits the run, which is what a hang deserves."""
    return pytest.mark.timeout(active_profile().timeout_s, method="thread")
