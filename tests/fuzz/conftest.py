"""Hypothesis profiles for the fuzz targets, and what every target shares.

``fuzz-quick`` runs in the default test run (a few seconds per target); ``fuzz`` is what
``./dev.sh fuzz`` runs: at least 100,000 cases per target. ``CMA_QEMU_FUZZ_PROFILE`` picks
one; only the targets in this directory use these profiles, so the unit tests keep their own
settings whichever is chosen.

The helpers and strategies of the unit property tests are reused rather than copied, so the
directory that holds them is put on ``sys.path`` here (pytest's default import mode only does
that for a directory it is collecting).
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings

_UNIT_TESTS = str(Path(__file__).resolve().parent.parent / "unit")
if _UNIT_TESTS not in sys.path:
    sys.path.append(_UNIT_TESTS)

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

# A deadline catches a case that is merely slow; the hang guard (no_hang in fuzzing.py, which
# every target runs its cases under) catches one that never ends, by CPU time. The deadline
# is wall time, so the long profile has none: its runs are niced on a shared machine, where
# a 25 ms case once waited 75 s for the CPU.
settings.register_profile(
    "fuzz-quick",
    max_examples=100,
    deadline=timedelta(seconds=30),
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "fuzz",
    max_examples=100_000,
    deadline=None,
    suppress_health_check=_SLOW_OK,
    # Keep generating: shrinking a failure is still done, the example database is skipped so
    # a long run does not write 100,000 entries.
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)
