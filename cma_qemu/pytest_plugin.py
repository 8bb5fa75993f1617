"""pytest plugin (entry point ``pytest11``): fixtures that boot a board and share it.

The fixtures arrive with the agent layer; until then the plugin only registers its options.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--cma-board``: the board the fixtures boot (default ``virt``)."""
    group = parser.getgroup("cma-qemu")
    group.addoption("--cma-board", default="virt", help="board the cma-qemu fixtures boot")
