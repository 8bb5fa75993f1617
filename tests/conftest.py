"""Shared test set-up: ``tests/cma_helpers.py`` importable from every test directory, and
SIGINT deliverable to the programs the tests start.

The helpers the unit and fuzz tests share (a small framework, a snapshot of its state) are in
``cma_helpers.py`` beside this file, not here: see that module for why. pytest's default
import mode puts only the directories it collects from on ``sys.path``, so this adds
``tests/``, whatever import mode is in use.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# A shell starts a background job (`cmd &` without job control) with SIGINT ignored, and an
# ignored signal stays ignored across exec: every cma-qemu the tests start would then ignore
# the SIGINT that the Ctrl-C tests send it (CPython keeps an inherited SIG_IGN, as a program
# in a background job should). Catching it here makes it SIG_DFL again in every child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
