"""Runtime directories that name their owner, and the sweep of those whose owner is gone.

A process killed with SIGKILL cannot remove what it created, so every runtime directory (the
QMP and channel sockets, the patched DTB, pmemsave dumps) holds a file ``owner`` with the pid
and the start time of the process that made it (the start time tells a reused pid apart).
Each new launch first removes the directories of owners that no longer exist: whatever an
agent leaves behind lives at most until the next start.

Older versions left two other things, and the sweep removes them too: runtime directories
without an ``owner`` file (removed once no live process has a socket bound in them and they
are a minute old) and guest RAM files ``/dev/shm/cma-qemu-*.ram`` (removed once no process
has them open or mapped and they are a minute old). Only the caller's own files are touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "OWNER_FILE",
    "PREFIX",
    "claim",
    "create",
    "default_parent",
    "owner_alive",
    "sweep",
]

PREFIX = "cma-qemu-"
OWNER_FILE = "owner"
#: Files of older versions younger than this may still be in the making: left alone.
LEGACY_GRACE = 60.0
_LEGACY_SOCKETS = ("qmp.sock", "channel.sock", "monitor.sock")


def default_parent() -> str:
    """``$XDG_RUNTIME_DIR`` when it is a writable directory, else the temporary directory."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return xdg
    return tempfile.gettempdir()


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (``/proc/PID/stat`` field 22).

    None when there is no such process or it is a zombie (it has exited; only its parent's
    ``wait`` is missing).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _owner_text(pid: int) -> str:
    return f"{pid} {_start_time(pid) or 0}\n"


def owner_alive(directory: Path) -> bool | None:
    """Whether the process named in ``directory/owner`` still runs; None if there is no owner."""
    try:
        # Bytes: the file is ASCII, and str.split() would also split at \x1c-\x1f.
        pid_text, start_text = (directory / OWNER_FILE).read_bytes().split()
        pid, start = int(pid_text), int(start_text)
    except (OSError, ValueError):
        return None
    return _start_time(pid) == start


def claim(path: str | os.PathLike[str]) -> None:
    """Name this process as the owner of ``path`` (a ``cma-qemu-*`` directory it made)."""
    (Path(path) / OWNER_FILE).write_text(_owner_text(os.getpid()))


def create(parent: str | os.PathLike[str] | None = None, prefix: str = PREFIX) -> Path:
    """A fresh 0700 directory naming this process as its owner. Cost: one mkdir, one write."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent or default_parent()))
    try:
        claim(path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def _bound_socket_paths() -> set[str]:
    """Paths of the Unix sockets some live process has bound (``/proc/net/unix``)."""
    paths: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/net/unix") as table:
        next(table, None)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("/"):
                paths.add(fields[7])
    return paths


def _paths_in_use() -> set[str]:
    """Every file some process (that this user may inspect) has open or mapped."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    used.add(os.readlink(fd))
        with contextlib.suppress(OSError):
            for line in (proc / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6:
                    used.add(fields[5])
    return used


def _mine_and_old(path: Path, now: float) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and now - st.st_mtime > LEGACY_GRACE


def _stale_dirs(parent: Path, now: float) -> list[Path]:
    stale: list[Path] = []
    bound: set[str] | None = None
    for path in parent.glob(f"{PREFIX}*"):
        if path.is_symlink() or not path.is_dir():
            continue
        alive = owner_alive(path)
        if alive is False:
            with contextlib.suppress(OSError):
                if path.stat().st_uid == os.getuid():
                    stale.append(path)
            continue
        if alive is None and _mine_and_old(path, now):
            sockets = [path / name for name in _LEGACY_SOCKETS if (path / name).exists()]
            if not sockets:
                continue  # not a runtime directory this project made (or not yet one)
            if bound is None:
                bound = _bound_socket_paths()
            if not any(str(s) in bound for s in sockets):
                stale.append(path)
    return stale


def _stale_ram_files(shm: Path, now: float) -> list[Path]:
    candidates = [p for p in shm.glob(f"{PREFIX}*.ram") if _mine_and_old(p, now)]
    if not candidates:
        return []
    used = _paths_in_use()
    return [p for p in candidates if str(p) not in used]


def sweep(
    parents: Iterable[str | os.PathLike[str]] = (),
    shm: str | os.PathLike[str] = "/dev/shm",
) -> list[Path]:
    """Remove what dead agents left in ``parents`` (default: :func:`default_parent`) and
    ``shm``; returns what was removed.

    Cost: one ``owner`` read per ``cma-qemu-*`` directory; a scan of ``/proc`` only when a
    file of an older version is a candidate.
    """
    now = time.time()
    removed: list[Path] = []
    for parent in {Path(p) for p in parents} or {Path(default_parent())}:
        for path in _stale_dirs(parent, now):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    if Path(shm).is_dir():
        for path in _stale_ram_files(Path(shm), now):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed
