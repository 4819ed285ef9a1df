"""Test configuration: Hypothesis profiles, and the pass-registry snapshot the property tests use.

Profiles (select with HYPOTHESIS_PROFILE=...):
  default   random examples, the counts each test sets (CI-sized)
  ci        the same counts, derandomized (reproducible runs)
  thorough  10x the examples (MORPHC_TEST_SCALE=10): run before merging a new pass
"""

from __future__ import annotations

import os

# Importing `strategies` now snapshots the pass registry before any test module registers a
# test-only pass at import time, so property tests cover exactly morphc's (and plugins') passes.
import strategies  # noqa: F401
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("default", **_COMMON)
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
if os.environ.get("HYPOTHESIS_PROFILE") == "thorough":
    os.environ.setdefault("MORPHC_TEST_SCALE", "10")
