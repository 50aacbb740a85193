"""pytest wiring: markers and Hypothesis profiles (the rank pool is the plugin's: verify/pytest_plugin.py)."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from verify.ranks.torchrun import is_torchrun

# -- Hypothesis profiles (the one place they are registered) ----------------------------------
# dev: quick local iterations. ci: reproducible (derandomized, no example database) and modest.
# nightly: many examples, for the scheduled matrix. Pick one with HYPOTHESIS_PROFILE; CI=true
# without HYPOTHESIS_PROFILE means ci.
settings.register_profile("dev", max_examples=10, deadline=None)
settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "nightly",
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
_ci = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
_profile = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _ci else "dev")
if is_torchrun():
    # Every rank must draw the same examples in the same order, whatever the profile.
    settings.register_profile(f"{_profile}-torchrun", parent=settings.get_profile(_profile),
                              derandomize=True, database=None)
    _profile = f"{_profile}-torchrun"
settings.load_profile(_profile)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with "
                            "-m 'not slow'")

# The `rank_pool` and `equivalence` fixtures and the `multigpu` marker come from the pytest plugin
# (verify/pytest_plugin.py, registered by `pip install` through the pytest11 entry point).
