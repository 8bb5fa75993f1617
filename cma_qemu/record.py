"""Recording: what the agent serves, written as a line-format script ``cma-qemu replay`` runs.

Every allocation and free the framework makes (from guests on any port and from the monitor)
becomes one line of docs/line-format.md, in order, with the chunk ids replay will assign (the
lowest id no live recorded chunk holds, :class:`~cma_qemu.script.LiveChunks`), so the ids in
the file are the ids replay prints. The board and attributes go in comment lines at the top,
with the replay command that reproduces the run.

An allocation is written as it was asked for, ``alloc DEV/KIND SIZE/ALIGN``, while the map and
asterisk are still those of the header and the names fit the line format; otherwise as
``alloc-from NAMES SIZE/ALIGN`` with the region list that was tried, which places the chunk
the same way. Each line is flushed as it is written (one ``write`` call), so a recording is
complete up to the last request even if the agent is killed.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cma_qemu.attributes import PAGE_SIZE
from cma_qemu.errors import EBUSY, ENOENT, ENOMEM, from_os_error
from cma_qemu.framework import (
    AllocEvent,
    AllocFailedEvent,
    Chunk,
    Cma,
    CmaChange,
    FreeEvent,
    SettingEvent,
)
from cma_qemu.script import MAX_LINE, MAX_NAME, LiveChunks

__all__ = ["Recorder", "RecordingHeader", "RecordingSwitch"]

_BAD_NAME_CHARS: Final = frozenset(" \t\n\r\0")


@dataclass(frozen=True)
class RecordingHeader:
    """What ``cma-qemu replay`` needs to place the same regions: the board and attributes."""

    board: str
    regions: str | None
    map: str
    asterisk: str
    allocator: str | None = None

    def replay_command(self, path: str) -> str:
        """The shell command that replays the recording at ``path``."""
        words = ["cma-qemu", "replay", path, "--board", self.board]
        if self.regions is not None:
            words += ["--cma", self.regions]
        words += ["--map", self.map, "--asterisk", self.asterisk]
        if self.allocator is not None:
            words += ["--allocator", self.allocator]
        return shlex.join(words)


def _fits(name: str) -> bool:
    """A dev or kind the line format can carry as it is."""
    return len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME and not (
        _BAD_NAME_CHARS & set(name)
    )


def _size_token(size: int, alignment: int) -> str:
    return f"{size:#x}" if alignment <= PAGE_SIZE else f"{size:#x}/{alignment:#x}"


class Recorder:
    """Writes the framework's allocations and frees to ``path`` until :meth:`close`.

    Cost per allocation or free: one dict operation, one heap operation (O(log n) in live
    recorded chunks) and one flushed ``write`` of a short line.
    """

    def __init__(self, cma: Cma, path: str | Path, header: RecordingHeader) -> None:
        self.cma = cma
        self.path = Path(path)
        self.header = header
        self.allocations = 0
        self.frees = 0
        self._ids = LiveChunks()
        self._id_at: dict[int, int] = {}  # chunk start -> recorded id
        self._owner: str | None = None
        self._settings_changed = False
        try:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as err:
            raise from_os_error(err, "record") from None
        self._write_header(cma.chunks)
        self._unsubscribe: Callable[[], None] | None = cma.subscribe_changes(self._on_change)

    # ------------------------------------------------------------------ lifecycle
    @property
    def recording(self) -> bool:
        """True until :meth:`close`."""
        return self._fd is not None

    def close(self) -> None:
        """Stop recording and close the file (idempotent)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._fd is not None:
            self._line(
                f"# stopped: {self.allocations} allocations, {self.frees} frees, "
                f"{len(self._ids)} chunks still live"
            )
            os.close(self._fd)
            self._fd = None

    def summary(self) -> dict[str, object]:
        """Path and counts, for the monitor's replies."""
        return {
            "path": str(self.path),
            "allocations": self.allocations,
            "frees": self.frees,
            "live": len(self._ids),
        }

    # ------------------------------------------------------------------ writing
    def _line(self, text: str) -> None:
        """One line, in one ``write`` call (no buffer to lose if the agent is killed)."""
        if text.startswith("#"):  # a comment must stay one line, whatever it quotes
            text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\0", "\\0")
        if self._fd is not None:
            os.write(self._fd, (text + "\n").encode("utf-8", "surrogateescape"))

    def _write_header(self, live: list[Chunk]) -> None:
        header = self.header
        self._line("# cma-qemu recording: every allocation and free the agent served, in order")
        self._line(f"# board: {header.board}")
        if header.regions is not None:
            self._line(f"# regions: {header.regions}")
        self._line(f"# map: {header.map}")
        self._line(f"# asterisk: {header.asterisk}")
        if header.allocator is not None:
            self._line(f"# allocator: {header.allocator}")
        for region in self.cma.regions:
            self._line(f"# region {region.label}: {region.size:#x}@{region.start:#x}")
        self._line(f"# replay: {header.replay_command(str(self.path))}")
        for chunk in live:
            self._line(
                f"# live before recording (not replayed): {chunk.size:#x}@{chunk.start:#x} "
                f"owner {chunk.owner}"
            )

    def _on_change(self, change: CmaChange) -> None:
        if isinstance(change, AllocEvent):
            self._alloc(change)
        elif isinstance(change, FreeEvent):
            self._free(change.chunk)
        elif isinstance(change, AllocFailedEvent):
            self._failed(change)
        elif isinstance(change, SettingEvent) and change.what in ("map", "asterisk"):
            self._settings_changed = True
            self._line(f"# {change.what} set to {change.value!r}: allocations name their regions")

    def _note_owner(self, owner: str | None) -> None:
        if owner != self._owner:
            self._owner = owner
            self._line(f"# from {owner or 'the API'}")

    def _request(
        self, dev: str | None, kind: str | None, names: tuple[str, ...], size: int, align: int
    ) -> str | None:
        """The line-format request that asks for this again, or None if none can."""
        kind = kind or ""
        as_asked = dev and not self._settings_changed and "/" not in kind
        if as_asked and dev is not None and _fits(dev) and _fits(kind):
            return f"alloc {dev}/{kind} {_size_token(size, align)}"
        if names and all(n and _fits(n) and "," not in n for n in names):
            line = f"alloc-from {','.join(names)} {_size_token(size, align)}"
            if len(line.encode("utf-8", "surrogateescape")) <= MAX_LINE:
                return line
        return None

    def _alloc(self, event: AllocEvent) -> None:
        chunk = event.chunk
        self._note_owner(chunk.owner)
        names = event.regions
        if not names and chunk.region.name is not None:
            names = (chunk.region.name,)  # alloc_from_region on a named region
        request = self._request(event.dev, event.kind, names, chunk.requested, event.alignment)
        if request is None:
            self._line(
                f"# not replayable (private region or odd names): {chunk.requested:#x} "
                f"at {chunk.size:#x}@{chunk.start:#x}"
            )
            return
        chunk_id = self._ids.add(chunk.start, chunk.size)
        self._id_at[chunk.start] = chunk_id
        self.allocations += 1
        self._line(request)

    def _free(self, chunk: Chunk) -> None:
        chunk_id = self._id_at.pop(chunk.start, None)
        if chunk_id is None:
            self._line(f"# free of a chunk not in this recording: {chunk.size:#x}@{chunk.start:#x}")
            return
        self._note_owner(chunk.owner)
        self._ids.remove(chunk_id)
        self.frees += 1
        self._line(f"free {chunk_id}")

    def _failed(self, event: AllocFailedEvent) -> None:
        """An ENOMEM failure replays as the same error line; other failures are comments."""
        request = None
        private = any(n.startswith("<private@") for n in event.regions)
        if isinstance(event.error, ENOMEM) and event.size > 0 and not private:
            request = self._request(
                event.dev, event.kind, event.regions, event.size, event.alignment
            )
        if request is None:
            self._line(f"# failed: {event.error.errno_name}: {event.error}")
        else:
            self._line(request)


class RecordingSwitch:
    """At most one recording at a time, started and stopped by path (``--record`` and the
    monitor's ``cma-record-start``/``cma-record-stop``).

    ``header`` is called at each start, so a recording started after a runtime map change
    notes the map in force.
    """

    def __init__(self, cma: Cma, header: Callable[[], RecordingHeader]) -> None:
        self.cma = cma
        self.header = header
        self.recorder: Recorder | None = None

    def start(self, path: str | Path) -> dict[str, object]:
        """Start recording to ``path`` (EBUSY while a recording runs)."""
        if self.recorder is not None:
            raise EBUSY(f"already recording to {self.recorder.path}", where="record")
        self.recorder = Recorder(self.cma, path, self.header())
        return self.recorder.summary()

    def stop(self) -> dict[str, object]:
        """Stop the recording (ENOENT if there is none); what it holds."""
        recorder = self.recorder
        if recorder is None:
            raise ENOENT("not recording", where="record")
        self.recorder = None
        recorder.close()
        return recorder.summary()

    def close(self) -> None:
        """Stop a running recording, if any (idempotent)."""
        if self.recorder is not None:
            self.stop()
