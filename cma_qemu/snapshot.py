"""Snapshots of a booted board with its CMA state, and restores that serve a fresh guest.

A snapshot directory holds::

    snapshot.json   the key (QEMU version, board, attributes, placed regions, hashes of the
                    kernel, initramfs and patched DTB), the agent's state (allocator choices,
                    live chunks with owners and refcounts) and the sizes and hashes of:
    state.mig       QEMU's device state (``x-ignore-shared`` migration: no RAM), or on a
                    board without a shared RAM backend (smdkc210) the device state and RAM
    guest.ram       guest RAM, sparse (only the pages the guest touched take space); only
                    on a board with a shared RAM backend (virt)
    guest.dtb       the patched device tree the guest booted with

A restore checks everything it can before QEMU starts, so a missing, foreign, truncated or
stale directory is one error and no process. It is valid only for the reservations it was
booted with (the device tree is in the saved RAM; QEMU ignores ``-dtb`` on restore), which is
why the placed regions are part of the key. docs/snapshots.md says why it works this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cma_qemu.boards import Board, load_board
from cma_qemu.configuration import build_cma
from cma_qemu.errors import (
    EBUSY,
    EINVAL,
    EIO,
    ENODEV,
    ENOENT,
    EOPNOTSUPP,
    CmaError,
    from_os_error,
)
from cma_qemu.framework import Cma
from cma_qemu.guest_image import find_guest
from cma_qemu.machine.launch import QEMU, Machine, uses_ram_file
from cma_qemu.machine.migration import RestoredMachine, copy_sparse, save_state
from cma_qemu.machine.profiles import ram_extent
from cma_qemu.machine.qmp import qmp_call

if TYPE_CHECKING:
    from cma_qemu.agent import Agent

__all__ = [
    "SNAPSHOT_FILE",
    "SnapshotInfo",
    "default_snapshot_dir",
    "list_snapshots",
    "read_snapshot",
    "remove_snapshot",
    "restore_agent",
    "snapshot_agent",
]

SNAPSHOT_FILE: Final = "snapshot.json"
_STATE, _RAM, _DTB = "state.mig", "guest.ram", "guest.dtb"
_FORMAT: Final = "cma-qemu-snapshot"
_VERSION: Final = 1


def default_snapshot_dir() -> Path:
    """``~/.cache/cma-qemu/snapshots`` (``$XDG_CACHE_HOME`` honoured)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cma-qemu" / "snapshots"


@functools.cache
def qemu_version(qemu: str = QEMU) -> str:
    """``qemu-system-arm --version``'s first line (once per process: about 20 ms)."""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise ENODEV(f"cannot run {qemu} --version: {err}", where="qemu") from None
    return out.stdout.splitlines()[0].strip()


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) so a restore rehashes nothing."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


@dataclass(frozen=True)
class SnapshotInfo:
    """What ``snapshot.json`` says (validated by :func:`read_snapshot`)."""

    path: Path
    key: dict[str, Any]
    allocators: dict[int, str | None]
    chunks: list[tuple[int, int, int, int, str | None]]
    files: dict[str, dict[str, Any]]
    created: float
    board_file: str | None = None

    @property
    def board(self) -> str:
        return str(self.key["board"])


def _attributes(agent: Agent) -> dict[str, Any]:
    board, cma = agent.board, agent.cma
    return {
        "board": board.name,
        "regions": board.regions if agent.regions_text is None else agent.regions_text,
        "map": cma.map_text,
        "asterisk": cma.asterisk_text,
        "allocator": agent.allocator,
    }


def _layout(cma: Cma) -> list[list[Any]]:
    return [[r.name, r.start, r.size] for r in cma.regions]


def _key(board: Board, attributes: dict[str, Any], cma: Cma, dtb_sha: str) -> dict[str, Any]:
    image = find_guest(board.kernel_flavour)
    return {
        **attributes,
        "qemu": qemu_version(),
        "machine": board.machine_type,
        "channel": board.channel.kind,  # smdkc210's net and UART boards share a machine
        "layout": _layout(cma),
        "kernel": file_sha256(Path(image.kernel)),
        "initrd": file_sha256(Path(image.initrd)),
        "dtb": dtb_sha,
    }


def _saved_files(info: SnapshotInfo) -> tuple[str, ...]:
    """The data files a snapshot holds: no ``guest.ram`` when its RAM is in the stream."""
    return (_STATE, _RAM, _DTB) if _RAM in info.files else (_STATE, _DTB)


# ---------------------------------------------------------------------------- saving
async def snapshot_agent(agent: Agent, path: Path) -> SnapshotInfo:
    """Save ``agent``'s booted guest and CMA state into the directory ``path``.

    The guest is stopped, requests it sent before are answered (the stop halts new ones),
    its device state and RAM are copied, and it runs on. Cost on virt: one migration (tens
    of ms) plus the RAM pages in use; on smdkc210 one migration carrying RAM (about 0.5 s).

    EBUSY on a net channel while a guest connection holds chunks: the connection is joined to
    a ``socat`` QEMU started on the host, which a restored QEMU does not have, so the guest
    program's connection is reset and its chunks would have no session to free them. A UART
    or virtio-serial channel's held session survives (``smdkc210-uart``, docs/snapshots.md).
    """
    machine = agent.machine
    if not isinstance(machine, Machine):
        raise EOPNOTSUPP("only a machine this agent launched can be saved", where="snapshot")
    board = agent.board
    if board.channel.kind == "net" and (held := agent.chunks_of_guest()):
        owners = ", ".join(sorted({str(c.owner) for c in held}))
        raise EBUSY(
            f"{len(held)} chunk(s) held by guest net connections ({owners}): a TCP session "
            "does not survive a restore; free them first, or use a UART board (smdkc210-uart)",
            where="snapshot",
        )
    ram_path = machine.ram_path  # None: the RAM goes in the migration stream (smdkc210)
    assert machine.files is not None
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        for name in (SNAPSHOT_FILE, _STATE, _RAM, _DTB):  # an old snapshot here goes first
            with contextlib.suppress(FileNotFoundError):
                (path / name).unlink()
        shutil.copyfile(machine.files.dtb, path / _DTB)
    except OSError as err:
        raise from_os_error(err, f"snapshot {path}") from None
    _, total, _ = ram_extent(board)
    qmp = machine.qmp
    try:
        await save_state(qmp, path / _STATE, ignore_shared=ram_path is not None)
        # the guest is stopped: the chunk state and the RAM copy are of the same instant
        cma = agent.cma
        chunks = [[c.start, c.size, c.requested, c.refcount, c.owner] for c in cma.chunks]
        allocators = {str(r.start): r.allocator_name for r in cma.regions}
        if ram_path is not None:
            src = os.open(ram_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                dst = os.open(path / _RAM, flags, 0o600)
                try:
                    await asyncio.to_thread(copy_sparse, src, dst, total)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
    except BaseException as error:
        for name in (_STATE, _RAM, _DTB):  # no half snapshot left behind
            with contextlib.suppress(OSError):
                (path / name).unlink()
        if isinstance(error, OSError):
            raise from_os_error(error, f"snapshot {path}") from None
        raise
    finally:
        with contextlib.suppress(Exception):  # the guest runs on, whatever the save did
            await qmp_call(qmp, "cont")
    attributes = _attributes(agent)
    key = _key(board, attributes, agent.cma, file_sha256(path / _DTB))
    state = path / _STATE
    files: dict[str, dict[str, Any]] = {
        _STATE: {"size": state.stat().st_size, "sha256": file_sha256(state)},
        _DTB: {"size": (path / _DTB).stat().st_size, "sha256": key["dtb"]},
    }
    if ram_path is not None:
        files[_RAM] = {"size": total}
    doc = {
        "board_file": str(board.path),
        "format": _FORMAT,
        "version": _VERSION,
        "created": time.time(),
        "key": key,
        "allocators": allocators,
        "chunks": chunks,
        "files": files,
    }
    temporary = path / (SNAPSHOT_FILE + ".new")
    temporary.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(temporary, path / SNAPSHOT_FILE)  # last: a directory without it is no snapshot
    return read_snapshot(path)


# ---------------------------------------------------------------------------- reading
def read_snapshot(path: Path) -> SnapshotInfo:
    """Read and check a snapshot directory's files (not yet the key against this host).

    ENOENT: no such directory or file; EINVAL: not a cma-qemu snapshot; EIO: a file is cut
    short or does not hash to what was saved. Cost: hashing the device state (~345 KB on
    virt, once per process; tens of MiB with the RAM on smdkc210, about 0.1 s).
    """
    path = Path(path)
    where = f"snapshot {path}"
    meta = path / SNAPSHOT_FILE
    if not path.is_dir():
        raise ENOENT("no such snapshot directory", where=where)
    try:
        doc = json.loads(meta.read_text())
    except FileNotFoundError:
        raise EINVAL(f"not a cma-qemu snapshot (no {SNAPSHOT_FILE})", where=where) from None
    except (OSError, ValueError) as err:
        raise EINVAL(f"unreadable {SNAPSHOT_FILE}: {err}", where=where) from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise EINVAL("not a cma-qemu snapshot", where=where)
    if doc.get("version") != _VERSION:
        raise EINVAL(f"snapshot format {doc.get('version')!r}, this is {_VERSION}", where=where)
    try:
        info = SnapshotInfo(
            path,
            dict(doc["key"]),
            {int(s): (None if a is None else str(a)) for s, a in doc["allocators"].items()},
            [
                (int(a), int(b), int(c), int(d), None if e is None else str(e))
                for a, b, c, d, e in doc["chunks"]
            ],
            {str(k): dict(v) for k, v in doc["files"].items()},
            float(doc["created"]),
            None if doc.get("board_file") is None else str(doc["board_file"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise EINVAL(f"malformed {SNAPSHOT_FILE}: {err!r}", where=where) from None
    for name in _saved_files(info):
        expected = info.files.get(name, {})
        try:
            size = (path / name).stat().st_size
        except OSError as err:
            raise from_os_error(err, where) from None
        if size != expected.get("size"):
            raise EIO(f"{name} is {size} bytes, {expected.get('size')} were saved", where=where)
        if "sha256" in expected and file_sha256(path / name) != expected["sha256"]:
            raise EIO(f"{name} does not hash to what was saved (corrupt)", where=where)
    return info


def _check_key(info: SnapshotInfo, board: Board, cma: Cma) -> None:
    """EINVAL naming every difference between the saved key and this host's."""
    now = _key(board, {k: info.key.get(k) for k in _ATTRIBUTE_KEYS}, cma, info.key.get("dtb", ""))
    names = {
        "kernel": "the guest kernel",
        "initrd": "the initramfs",
        "qemu": "QEMU",
        "layout": "the placed regions (the board file?)",
    }
    diffs = [
        names.get(k, k) + (" changed" if k in names else f" {info.key.get(k)!r} saved, {v!r} now")
        for k, v in now.items()
        if info.key.get(k) != v
    ]
    if diffs:
        raise EINVAL(
            "stale snapshot: " + "; ".join(diffs) + "; save it again", where=f"snapshot {info.path}"
        )


_ATTRIBUTE_KEYS: Final = ("board", "regions", "map", "asterisk", "allocator")


# ---------------------------------------------------------------------------- restoring
async def restore_agent(
    path: Path,
    *,
    monitor_path: Path | None = None,
    timeout: float = 60.0,
    runtime_parent: str | os.PathLike[str] | None = None,
) -> Agent:
    """A fully served agent on a new QEMU started from the snapshot at ``path``.

    Every check runs before QEMU starts. The channel is connected before the device state
    loads, the chunks are restored after (QEMU replays the port's saved open/closed state as
    a ``VSERPORT_CHANGE``, which must not release them), and the guest's clock is set (it
    lags by the time since the snapshot; :func:`_set_clock`). Cost on virt: the RAM pages in
    use copied into a new RAM file, then about 0.1 s of QEMU CPU; on smdkc210 loading the
    stream with its RAM (BENCHMARKS.md, "Snapshot and restore").
    """
    from cma_qemu.agent import Agent

    info = read_snapshot(path)
    where = f"snapshot {info.path}"
    try:
        board = load_board(info.board)
    except CmaError as err:
        if info.board_file is None:
            raise EINVAL(f"board {info.board!r}: {err.message}", where=where) from None
        try:  # a board file of one's own, not among the boards by name
            board = load_board(info.board_file)
        except CmaError as err2:
            raise EINVAL(f"board {info.board_file}: {err2.message}", where=where) from None
    if uses_ram_file(board) != (_RAM in info.files):
        raise EINVAL(
            f"{board.name}: a snapshot {'with' if _RAM in info.files else 'without'} "
            f"{_RAM} does not fit this board's RAM (board file changed?); save it again",
            where=where,
        )
    key = info.key
    cma = build_cma(
        board=board,
        regions=key.get("regions"),
        map_text=key.get("map"),
        asterisk=key.get("asterisk"),
        allocator=key.get("allocator"),
    )
    _check_key(info, board, cma)
    regions = {r.start: r for r in cma.regions}
    for start, name in info.allocators.items():
        region = regions.get(start)
        if region is None:
            raise EINVAL(f"no region starts at {start:#x}", where=where)
        if region.allocator_name != name:
            cma.set_region_allocator(region, name)
    image = find_guest(board.kernel_flavour)
    reservations = [(r.name, r.start, r.size) for r in cma.regions]
    machine = RestoredMachine(
        board,
        reservations,
        image=image,
        ram_source=info.path / _RAM if _RAM in info.files else None,
        dtb=info.path / _DTB,
        runtime_parent=runtime_parent,
    )
    t0 = time.monotonic()
    await machine.start()
    regions_text = key.get("regions")
    try:
        agent = await Agent._serve(
            board,
            cma,
            machine,
            monitor_path or machine.runtime_dir,
            regions=None if regions_text == board.regions else regions_text,
            allocator=key.get("allocator"),
            record=None,
        )
    except BaseException:
        await machine.close()
        raise
    try:
        await machine.resume(info.path / _STATE, timeout=timeout)
        for start, size, requested, refcount, owner in info.chunks:
            cma.restore_chunk(start, size, requested, owner=owner, refcount=refcount)
        await machine.console.check(_set_clock(), timeout=timeout)
        machine.boot_time = time.monotonic() - t0
    except BaseException:
        await agent.close()
        raise
    return agent


def _set_clock() -> str:
    """The guest command that sets its clock: from the RTC where there is one (virt's PL031
    reads host time), else from the host's clock typed in (smdkc210's guest has no RTC
    driver; off by at most half a second plus the console's latency)."""
    return f"hwclock -s 2>/dev/null || date -s @{round(time.time())} >/dev/null"


# ---------------------------------------------------------------------------- the cache
def list_snapshots(parent: Path | None = None) -> list[SnapshotInfo | CmaError]:
    """Every snapshot directory under ``parent`` (default cache), or why it is unusable."""
    parent = default_snapshot_dir() if parent is None else parent
    found: list[SnapshotInfo | CmaError] = []
    if not parent.is_dir():
        return found
    for child in sorted(parent.iterdir()):
        if child.is_dir():
            try:
                found.append(read_snapshot(child))
            except CmaError as err:
                found.append(err)
    return found


def remove_snapshot(path: Path) -> None:
    """Remove a snapshot directory: EINVAL (and nothing removed) if it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise ENOENT("no such snapshot directory", where=f"snapshot {path}")
    if not (path / SNAPSHOT_FILE).is_file():
        raise EINVAL(
            f"not a cma-qemu snapshot (no {SNAPSHOT_FILE}); not removed", where=f"snapshot {path}"
        )
    shutil.rmtree(path)
