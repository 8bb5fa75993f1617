"""Cache entries of the guest build, published whole or not at all.

Every cached thing (an unpacked package, the stub, a kbuild tree, a built module) is a
directory that a build fills beside its final place and then renames into it, marked
complete. A build that fails or is killed half-way leaves no entry that looks usable: at
worst a hidden temporary directory, and no ``.complete`` marker.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["COMPLETE", "is_complete", "publishing"]

#: The marker file of a finished entry.
COMPLETE = ".complete"


def is_complete(entry: Path) -> bool:
    """Whether ``entry`` was published whole (a stat)."""
    return (entry / COMPLETE).is_file()


@contextlib.contextmanager
def publishing(final: Path) -> Iterator[Path]:
    """A fresh directory beside ``final`` to fill; on a normal exit it becomes ``final``.

    The previous ``final``, if any, is replaced; on an exception it stays as it was and the
    fresh directory is removed. Cost: a mkdtemp and a rename (plus removing an old entry).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        (tmp / COMPLETE).touch()
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
