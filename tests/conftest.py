"""Shared test set-up: ``tests/cma_helpers.py`` importable from every test directory.

The helpers the unit and fuzz tests share (a small framework, a snapshot of its state) are in
``cma_helpers.py`` beside this file, not here: see that module for why. pytest's default
import mode puts only the directories it collects from on ``sys.path``, so this adds
``tests/``, whatever import mode is in use.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
