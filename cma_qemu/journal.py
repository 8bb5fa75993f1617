"""The agent's journal: the state a restarted agent needs to go on serving the same guest.

An attached QEMU outlives its agent, and so do the chunks its guest holds. The journal is an
append-only text file: a header line naming the board, the attributes, the placed regions and
the QEMU (its QMP socket's inode), then one line per change the framework reports, written with
one ``write`` call before the call that made the change returns, so before the reply that
reports it. That survives the agent dying (the bytes are in the kernel's page cache) but not
the host, which would take QEMU with it, so nothing is fsync'ed.

Lines (numbers in hex, strings as JSON)::

    cma-journal 1 {"board": ..., "regions": ..., ...}     header
    a START SIZE REQUESTED REFCOUNT "OWNER"                a chunk was allocated
    f START                                                 ... freed
    c START REFCOUNT                                        ... its refcount changed
    m "MAP"  /  k "ASTERISK"                                runtime map / asterisk writes
    l REGION-START "ALLOCATOR"                              a region's allocator choice

When the file holds more than four lines per live chunk (and at least ``compact_at``), it is
rewritten as header + current state into a new file that replaces the old one atomically, so
its size stays proportional to the live state and each change costs O(1) amortised. A last
line without its newline (the agent died mid-write) is detected and ignored: restore recovers
up to the last whole record. The store was chosen by measurement (see BENCHMARKS.md, "Record
and journal"): this file costs a few microseconds per change, SQLite in WAL mode several
times that.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from cma_qemu.errors import EBUSY, EINVAL, EIO, CmaError, from_os_error
from cma_qemu.framework import (
    AllocEvent,
    Chunk,
    Cma,
    CmaChange,
    FreeEvent,
    RefcountEvent,
    SettingEvent,
)

__all__ = [
    "JOURNAL_NAME",
    "ChunkRecord",
    "Journal",
    "JournalIdentity",
    "JournalState",
    "RestoreReport",
    "qemu_identity",
    "read_journal",
]

log = logging.getLogger(__name__)

#: The journal's file name when ``--state`` is not given: beside QEMU's sockets.
JOURNAL_NAME: Final = "cma-state.journal"
_MAGIC: Final = "cma-journal"
_VERSION: Final = 1


@dataclass(frozen=True)
class JournalIdentity:
    """What must match for a journal to be restored: the board and how its regions were made.

    ``layout`` is the placed regions as (name, start, size, allocator asked for), so a board
    file that changed under the same name is refused too.
    """

    board: str
    regions: str
    map: str
    asterisk: str
    allocator: str | None
    layout: tuple[tuple[str | None, int, int, str | None], ...]

    @classmethod
    def of(cls, board: str, regions: str, cma: Cma, allocator: str | None) -> JournalIdentity:
        """The identity of a framework as the agent built it (before any runtime change)."""
        layout = tuple((r.name, r.start, r.size, r.allocator_name) for r in cma.regions)
        return cls(board, regions, cma.map_text, cma.asterisk_text, allocator, layout)

    def differences(self, other: JournalIdentity) -> list[str]:
        """What differs, as ``FIELD X in the journal, Y here`` phrases (empty: the same).

        The placed layout follows from the rest, so it is named only when nothing else
        differs (the board file changed under the same name), and briefly.
        """
        mine, theirs = asdict(self), asdict(other)
        found = [
            f"{name} {mine[name]!r} in the journal, {theirs[name]!r} here"
            for name in mine
            if name != "layout" and _plain(mine[name]) != _plain(theirs[name])
        ]
        if not found and _plain(self.layout) != _plain(other.layout):
            found.append("the regions are placed differently (the board file changed?)")
        return found


def _plain(value: object) -> object:
    """Tuples and lists compare equal (JSON has only lists)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


@dataclass
class ChunkRecord:
    """A live chunk as the journal holds it."""

    start: int
    size: int
    requested: int
    refcount: int
    owner: str | None


@dataclass
class JournalState:
    """Everything a journal file says, replayed in order."""

    identity: JournalIdentity
    qemu: str
    chunks: dict[int, ChunkRecord] = field(default_factory=dict)
    map: str | None = None
    asterisk: str | None = None
    allocators: dict[int, str | None] = field(default_factory=dict)
    records: int = 0
    truncated: bool = False


@dataclass(frozen=True)
class RestoreReport:
    """What :meth:`Journal.open` did with an existing file."""

    path: Path
    restored: int = 0
    truncated: bool = False
    stale: bool = False
    fresh: bool = True

    def as_json(self) -> dict[str, object]:
        """For ``attach --json``."""
        return {
            "path": str(self.path),
            "restored": self.restored,
            "truncated": self.truncated,
            "stale": self.stale,
            "fresh": self.fresh,
        }

    def describe(self) -> str:
        """One line for people."""
        if self.fresh:
            return f"new journal {self.path}"
        if self.stale:
            return f"journal {self.path} was of an earlier QEMU; started afresh"
        text = f"restored {self.restored} chunk(s) from {self.path}"
        return text + (" (its last record was cut short and skipped)" if self.truncated else "")


def qemu_identity(qmp_path: str | os.PathLike[str]) -> str:
    """Which QEMU this is: its QMP socket's device and inode (a new QEMU makes a new one)."""
    try:
        st = os.stat(qmp_path)
    except OSError as err:
        raise from_os_error(err, "journal") from None
    return f"{st.st_dev}:{st.st_ino}"


# ---------------------------------------------------------------------------- reading
def _identity_from(data: dict[str, object]) -> JournalIdentity:
    layout = data["layout"]
    assert isinstance(layout, list)
    return JournalIdentity(
        board=str(data["board"]),
        regions=str(data["regions"]),
        map=str(data["map"]),
        asterisk=str(data["asterisk"]),
        allocator=None if data["allocator"] is None else str(data["allocator"]),
        layout=tuple((n, int(s), int(z), a) for n, s, z, a in layout),
    )


def _apply(state: JournalState, line: str) -> None:
    kind, _, rest = line.partition(" ")
    if kind == "a":
        start, size, requested, refcount, owner = rest.split(" ", 4)
        state.chunks[int(start, 16)] = ChunkRecord(
            int(start, 16), int(size, 16), int(requested, 16), int(refcount), json.loads(owner)
        )
    elif kind == "f":
        del state.chunks[int(rest, 16)]
    elif kind == "c":
        start, refcount = rest.split(" ")
        state.chunks[int(start, 16)].refcount = int(refcount)
    elif kind == "m":
        state.map = str(json.loads(rest))
    elif kind == "k":
        state.asterisk = str(json.loads(rest))
    elif kind == "l":
        region, name = rest.split(" ", 1)
        value = json.loads(name)
        state.allocators[int(region, 16)] = None if value is None else str(value)
    else:
        raise ValueError(f"unknown record {kind!r}")


def read_journal(path: str | os.PathLike[str]) -> JournalState:
    """Replay a journal file. O(records).

    A last line without its newline is a record cut short (``truncated``); any other line that
    does not parse is EIO naming it, and a file without our header is EINVAL.
    """
    where = f"journal {os.fspath(path)}"
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise from_os_error(err, where) from None
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    if not lines:
        raise EINVAL("not a cma-qemu journal (no complete header line)", where=where)
    magic, _, rest = lines[0].partition(" ")
    version, _, header = rest.partition(" ")
    if magic != _MAGIC or version != str(_VERSION):
        raise EINVAL(f"not a cma-qemu journal version {_VERSION}", where=where)
    try:
        head = json.loads(header)
        state = JournalState(_identity_from(head["identity"]), str(head["qemu"]))
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise EINVAL(f"unreadable journal header: {err}", where=where) from None
    for number, line in enumerate(lines[1:], start=2):
        try:
            _apply(state, line)
        except (ValueError, KeyError, TypeError) as err:
            raise EIO(f"line {number}: bad record {line[:80]!r}: {err}", where=where) from None
        state.records += 1
    state.truncated = bool(tail)
    return state


# ---------------------------------------------------------------------------- writing
def _lock(path: Path) -> int:
    """Hold ``PATH.lock`` exclusively (EBUSY if another agent does), as an open fd.

    Two agents on one journal would each rewrite it from under the other; the kernel drops the
    lock when its holder dies, even by SIGKILL.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise from_os_error(err, f"journal {path}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EBUSY("another agent is using it", where=f"journal {path}") from None
    return fd


def _chunk_line(chunk: Chunk) -> str:
    return (
        f"a {chunk.start:x} {chunk.size:x} {chunk.requested:x} {chunk.refcount} "
        f"{json.dumps(chunk.owner)}\n"
    )


class Journal:
    """Keeps ``path`` up to date with ``cma``'s state until :meth:`close`.

    Use :meth:`open`, which restores what an existing file holds first. Cost per change: one
    formatted line and one ``write`` syscall, plus an O(live) rewrite once per ``4 x live``
    changes (amortised O(1)).
    """

    def __init__(
        self,
        cma: Cma,
        path: str | os.PathLike[str],
        identity: JournalIdentity,
        qemu: str,
        *,
        compact_at: int = 4096,
        lock: int | None = None,
    ) -> None:
        self.cma = cma
        self.path = Path(path)
        self.identity = identity
        self.qemu = qemu
        self.compact_at = compact_at
        #: Records in the file now, and rewrites done (for tests and benchmarks).
        self.records = 0
        self.compactions = 0
        self._live = 0
        self._fd: int | None = None
        self._lock: int | None = _lock(self.path) if lock is None else lock
        try:
            self._compact()
        except BaseException:
            self._release_lock()
            raise
        self._unsubscribe = cma.subscribe_changes(self._on_change)

    @classmethod
    def open(
        cls,
        cma: Cma,
        path: str | os.PathLike[str],
        identity: JournalIdentity,
        qemu: str,
        *,
        compact_at: int = 4096,
    ) -> tuple[Journal, RestoreReport]:
        """Restore ``path`` into ``cma`` if it is this QEMU's, then journal from there.

        A journal of another board or other attributes is EINVAL and changes nothing (not
        even the file); one of an earlier QEMU (its QMP socket was made anew) is replaced,
        since its guest and chunks are gone. If a chunk cannot be restored, none is.
        """
        where = f"journal {os.fspath(path)}"
        lock = _lock(Path(path))
        try:
            report = cls._restore_file(cma, Path(path), identity, qemu, where)
        except BaseException:
            os.close(lock)
            raise
        # The journal owns the lock from here (and drops it if it cannot start).
        return cls(cma, path, identity, qemu, compact_at=compact_at, lock=lock), report

    @staticmethod
    def _restore_file(
        cma: Cma, path: Path, identity: JournalIdentity, qemu: str, where: str
    ) -> RestoreReport:
        report = RestoreReport(path)
        if path.exists():
            state = read_journal(path)
            differences = state.identity.differences(identity)
            if differences:
                raise EINVAL(
                    "it is for another board or other attributes: " + "; ".join(differences),
                    where=where,
                )
            if state.qemu != qemu:
                log.warning("%s: of an earlier QEMU; starting afresh", where)
                report = RestoreReport(Path(path), stale=True, fresh=False)
            else:
                _restore(cma, state, where)
                report = RestoreReport(Path(path), len(state.chunks), state.truncated, fresh=False)
        return report

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop journaling; the file stays, for the next agent (idempotent)."""
        self._unsubscribe()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # ------------------------------------------------------------------ writing
    def _write(self, line: str) -> None:
        if self._fd is None:
            return
        os.write(self._fd, line.encode("utf-8", "surrogateescape"))
        self.records += 1
        if self.records > self.compact_at and self.records > 4 * self._live:
            self._compact()

    def _on_change(self, change: CmaChange) -> None:
        if isinstance(change, AllocEvent):
            self._live += 1
            self._write(_chunk_line(change.chunk))
        elif isinstance(change, FreeEvent):
            self._live -= 1
            self._write(f"f {change.chunk.start:x}\n")
        elif isinstance(change, RefcountEvent):
            self._write(f"c {change.chunk.start:x} {change.chunk.refcount}\n")
        elif isinstance(change, SettingEvent):
            if change.what == "map":
                self._write(f"m {json.dumps(change.value)}\n")
            elif change.what == "asterisk":
                self._write(f"k {json.dumps(change.value)}\n")
            elif change.what == "allocator" and change.region is not None:
                self._write(f"l {change.region.start:x} {json.dumps(change.value)}\n")

    def _snapshot(self) -> list[str]:
        """Header and the current state as journal lines."""
        head = {"identity": asdict(self.identity), "qemu": self.qemu}
        lines = [f"{_MAGIC} {_VERSION} {json.dumps(head)}\n"]
        cma = self.cma
        if cma.map_text != self.identity.map:
            lines.append(f"m {json.dumps(cma.map_text)}\n")
        if cma.asterisk_text != self.identity.asterisk:
            lines.append(f"k {json.dumps(cma.asterisk_text)}\n")
        asked = {start: allocator for _, start, _, allocator in self.identity.layout}
        for region in cma.regions:
            if region.allocator_name != asked.get(region.start):
                lines.append(f"l {region.start:x} {json.dumps(region.allocator_name)}\n")
        chunks = cma.chunks
        self._live = len(chunks)
        lines += [_chunk_line(chunk) for chunk in chunks]
        return lines

    def _compact(self) -> None:
        """Rewrite the file as header + state, atomically (a new file renamed over the old)."""
        lines = self._snapshot()
        temporary = self.path.with_name(self.path.name + ".new")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, "".join(lines).encode("utf-8", "surrogateescape"))
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
            new_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as err:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise from_os_error(err, f"journal {self.path}") from None
        if self._fd is not None:
            os.close(self._fd)
        self._fd = new_fd
        self.records = len(lines) - 1
        self.compactions += 1


def _restore(cma: Cma, state: JournalState, where: str) -> None:
    """Settings first (an allocator can only change in an empty region), then the chunks."""
    restored: list[Chunk] = []
    try:
        if state.map is not None:
            cma.set_map(state.map)
        if state.asterisk is not None:
            cma.set_asterisk(state.asterisk)
        by_start = {r.start: r for r in cma.regions}
        for region_start, name in state.allocators.items():
            region = by_start.get(region_start)
            if region is None:
                raise EINVAL(f"no region starts at {region_start:#x}")
            cma.set_region_allocator(region, name)
        for record in state.chunks.values():
            restored.append(
                cma.restore_chunk(
                    record.start,
                    record.size,
                    record.requested,
                    owner=record.owner,
                    refcount=record.refcount,
                )
            )
    except CmaError as error:
        for chunk in restored:
            with contextlib.suppress(CmaError):
                cma.free(chunk.start)
        raise type(error)(f"cannot restore: {error}", where=where) from None
