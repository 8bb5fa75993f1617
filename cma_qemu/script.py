"""The ``cma-test`` line format: parse, run and print, exactly as the guest stub does.

``cma-qemu replay`` runs a script offline through :class:`FrameworkBackend`; the guest stub
(``guest/cma-test.c``) runs the same lines over the channel. ``docs/line-format.md`` is the
contract both follow, word for word, so their outputs can be compared byte for byte.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TextIO

from cma_qemu.attributes import memparse as parse_number
from cma_qemu.errors import CmaError
from cma_qemu.framework import Cma, CmaInfo

__all__ = [
    "MAX_LINE",
    "PROGRESS_EVERY",
    "FrameworkBackend",
    "LiveChunks",
    "ScriptBackend",
    "ScriptRunner",
    "parse_number",
]

#: Lines between two calls of :meth:`ScriptRunner.run`'s progress callback.
PROGRESS_EVERY = 4096
#: Longest line the stub accepts, without its newline (the 2010 test tool's 1023).
MAX_LINE = 1023
#: Longest device or kind name (``char[17]`` in ``struct cma_alloc_request``).
MAX_NAME = 16
MAX_ID = 2**31 - 1
MAX_COUNT = 1_000_000


class ScriptBackend(Protocol):
    """What a script needs from the allocator side: the framework, or the guest channel."""

    def alloc(self, dev: str, kind: str, size: int, alignment: int) -> int:
        """Allocate; return the start. Raises CmaError."""

    def alloc_from(self, regions: str, size: int, alignment: int) -> int:
        """Allocate from an explicit region list; return the start."""

    def free(self, addr: int) -> None:
        """Free the chunk at ``addr``."""

    def info(self, dev: str, kind: str) -> CmaInfo:
        """``cma_info`` for (dev, kind)."""

    def write(self, addr: int, size: int, pattern: int) -> None:
        """Fill the first ceil(size/4) words with ``pattern + i``."""

    def verify(self, addr: int, size: int, pattern: int) -> int | None:
        """Byte offset of the first word that differs, or None."""

    def ping(self) -> None:
        """An empty round trip."""


@dataclass
class FrameworkBackend:
    """Runs a script straight against a :class:`Cma` (offline replay).

    There is no guest memory offline, so ``write`` remembers the pattern and ``verify``
    compares against it: a different or missing pattern differs at word 0, as in the guest.
    """

    cma: Cma
    owner: str = "replay"
    patterns: dict[int, int] = field(default_factory=dict)

    def alloc(self, dev: str, kind: str, size: int, alignment: int) -> int:
        return self.cma.alloc(dev, kind, size, alignment, owner=self.owner).start

    def alloc_from(self, regions: str, size: int, alignment: int) -> int:
        return self.cma.alloc_from(regions, size, alignment, owner=self.owner).start

    def free(self, addr: int) -> None:
        self.cma.free(addr)
        self.patterns.pop(addr, None)

    def info(self, dev: str, kind: str) -> CmaInfo:
        return self.cma.info(dev, kind)

    def write(self, addr: int, size: int, pattern: int) -> None:
        self.patterns[addr] = pattern

    def verify(self, addr: int, size: int, pattern: int) -> int | None:
        return None if self.patterns.get(addr) == pattern else 0

    def ping(self) -> None:
        return None


class _LineError(Exception):
    """A local error: printed as ``CMD: ERRNO: message`` and the script goes on."""

    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.errno_name = errno_name
        self.message = message


class _Live(NamedTuple):
    """A live chunk as the script knows it (a tuple: cheap to make, and of no interest to the
    cycle collector)."""

    start: int
    size: int


#: Builds a :class:`_Live` from a tuple in C: half the cost of calling the class, whose
#: ``__new__`` is Python code.
_make_live = tuple.__new__


class LiveChunks:
    """The script's live chunks by id, in allocation order, with ids handed out like fds.

    A new chunk gets the lowest positive id no live chunk holds. Every id below
    ``_next_fresh`` that is not live sits in the min-heap ``_freed``, so that id is the heap's
    top, or ``_next_fresh`` when the heap is empty. Chunks sit in a plain dict, whose order is
    insertion order, so iteration is in allocation order (a reused id is a new insertion).
    "The newest" comes from ``_order``, every id in the order it was added, dead ones left in
    place: scanning back from its end, the first id still live is the newest live chunk (any
    later entry is a chunk freed since), and dead entries at the end are dropped on the way.
    (An ``OrderedDict`` does the same with a linked list, but costs twice the time per add and
    remove at 100k live chunks.) Costs: :meth:`add` and :meth:`remove` O(log n) (the heap),
    :meth:`newest` O(1) amortized, the rest O(1), iteration O(n), in the number of live chunks.
    """

    __slots__ = ("_chunks", "_freed", "_next_fresh", "_order", "get")

    def __init__(self) -> None:
        self._chunks: dict[int, _Live] = {}
        self._freed: list[int] = []
        self._next_fresh = 1
        #: Ids in the order they were added, dead ones included (see the class docstring);
        #: rebuilt from ``_chunks`` when dead ones outnumber the live.
        self._order: list[int] = []
        #: The live chunk with this id, or None: O(1) (the dict's own ``get``, no Python call).
        self.get: Callable[[int], _Live | None] = self._chunks.get

    def add(self, start: int, size: int) -> int:
        """Record a new chunk under the lowest unused id and return the id: O(log n)."""
        if self._freed:
            chunk_id = heapq.heappop(self._freed)
        else:
            chunk_id = self._next_fresh
            self._next_fresh += 1
        self._chunks[chunk_id] = _make_live(_Live, (start, size))  # _Live(...) without __new__
        order = self._order
        order.append(chunk_id)
        if len(order) > 2 * len(self._chunks) + 16:
            self._order = list(self._chunks)  # the live ids, in allocation order: O(n) once
        return chunk_id

    def remove(self, chunk_id: int) -> None:
        """Forget a live chunk; its id becomes reusable: O(log n)."""
        del self._chunks[chunk_id]
        heapq.heappush(self._freed, chunk_id)

    def newest(self) -> int | None:
        """The id of the most recently allocated live chunk, or None: O(1) amortized (each
        dead entry of ``_order`` is dropped once)."""
        order, chunks = self._order, self._chunks
        while order:
            if order[-1] in chunks:
                return order[-1]
            order.pop()
        return None

    def items(self) -> Iterator[tuple[int, _Live]]:
        """(id, chunk) in allocation order: O(n)."""
        return iter(self._chunks.items())

    def __len__(self) -> int:
        return len(self._chunks)

    def __iter__(self) -> Iterator[int]:
        return iter(self._chunks)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._chunks


#: A line of at most this many characters is at most MAX_LINE bytes (4 bytes a character at
#: most), so the common short line skips the encode.
_SHORT_LINE = MAX_LINE // 4


def _byte_length(text: str) -> int:
    """Bytes of ``text`` as the stub sees it: undecodable input bytes (read back as
    surrogateescape) count one each; any other lone surrogate, which only a Python caller
    can pass, counts as its three-byte encoding instead of raising."""
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))


def _split_dev(token: str) -> tuple[str, str]:
    dev, slash, kind = token.rpartition("/")
    if not slash:
        dev, kind = token, ""
    # char[17] in the request: the limit is in bytes, as the stub's strlen() counts.
    if len(token) <= MAX_NAME and token.isascii():
        return dev, kind
    if _byte_length(dev) > MAX_NAME or _byte_length(kind) > MAX_NAME:
        raise _LineError("EINVAL", "name or kind too long")
    return dev, kind


def _size_and_alignment(token: str) -> tuple[int, int]:
    size_text, slash, align_text = token.partition("/")
    size = parse_number(size_text)
    if size is None or size == 0:
        raise _LineError("EINVAL", "invalid size")
    alignment = 0
    if slash:
        value = parse_number(align_text)
        if value is None or value & (value - 1):
            raise _LineError("EINVAL", "invalid alignment")
        alignment = value
    return size, alignment


def _percentile(samples: list[float], fraction: float) -> int:
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return round(ordered[rank - 1] * 1e6)


class ScriptRunner:
    """Feeds lines to a backend and prints what ``cma-test`` prints.

    State (live chunks, the previous line) persists across :meth:`run_line` calls, so an
    interactive front end and a whole-file replay are the same code path, as in the 2010 test tool.
    """

    def __init__(
        self,
        backend: ScriptBackend,
        out: TextIO,
        err: TextIO,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.backend = backend
        self.out = out
        self._out_write = out.write
        self.err = err
        self.clock = clock
        self.live = LiveChunks()
        self.previous: str | None = None
        self.failures = 0
        self.allocations = 0
        self.failed_allocations = 0

    # ------------------------------------------------------------------ input
    def run(self, text: str, progress: Callable[[int, int], None] | None = None) -> None:
        """Run a whole script; a last line without a newline is reported, not run.

        ``progress(lines done, lines in all)``, if given, is called after every
        :data:`PROGRESS_EVERY` lines and at the end, so a caller's progress bar costs nothing
        per line.
        """
        lines = text.split("\n")
        body = lines[:-1]
        if progress is None:
            self._run_lines(body)
        else:
            for begin in range(0, len(body), PROGRESS_EVERY):
                self._run_lines(body[begin : begin + PROGRESS_EVERY])
                progress(min(begin + PROGRESS_EVERY, len(body)), len(body))
        if _byte_length(lines[-1]) > MAX_LINE:
            self._error("input", "EINVAL", "line too long")  # the stub checks length first
        elif lines[-1]:
            self._error("input", "EINVAL", "no new line at EOF")

    def _run_lines(self, lines: list[str]) -> None:
        """:meth:`run_line` for each line, with the usual line's path inline (one Python call
        less per line): short, starting with the command, words one space apart, no tab or
        NUL. Any other line goes through :meth:`run_line`."""
        commands = _COMMANDS
        run_line = self.run_line
        for line in lines:
            if (
                line
                and line[0] not in " \t#"
                and len(line) <= _SHORT_LINE
                and "\t" not in line
                and "\0" not in line
            ):
                words = line.split(" ")
                handler = commands.get(words[0])
                if handler is not None and "" not in words:
                    self.previous = line
                    try:
                        handler(self, words[0], words[1:])
                    except _LineError as error:
                        self._error(words[0], error.errno_name, error.message)
                    except CmaError as error:
                        self._error(words[0], error.errno_name, str(error))
                    continue
            run_line(line)

    def run_line(self, line: str) -> None:
        """Run one line (without its newline)."""
        if len(line) > _SHORT_LINE and _byte_length(line) > MAX_LINE:
            self._error("input", "EINVAL", "line too long")
            return
        if "\0" in line:
            line = line.partition("\0")[0]  # the stub's C strings end at a NUL
        stripped = line.lstrip(" \t")
        if not stripped:
            if self.previous is None:
                return
            stripped = self.previous
        elif stripped[0] == "#":
            return
        self.previous = stripped
        # Tokens are separated by spaces and tabs only, as in the stub (not "\r", "\v", ...).
        if "\t" in stripped:
            stripped = stripped.replace("\t", " ")
        words = stripped.split(" ")
        if "" in words:
            words = [word for word in words if word]
        command, args = words[0], words[1:]
        handler = _COMMANDS.get(command)
        if handler is None:
            self._error(command, "EINVAL", "unknown command")
            return
        try:
            handler(self, command, args)
        except _LineError as error:
            self._error(command, error.errno_name, error.message)
        except CmaError as error:
            self._error(command, error.errno_name, str(error))

    def _error(self, command: str, errno_name: str, message: str) -> None:
        self.failures += 1
        self.err.write(f"{command}: {errno_name}: {message}\n")

    # ------------------------------------------------------------------ helpers
    # The stub checks in this order, and so must we: missing arguments, each argument left to
    # right, text after the last one, the chunk lookup, then the request.
    @staticmethod
    def _need(args: list[str], needed: int) -> None:
        if len(args) < needed:
            raise _LineError("EINVAL", "missing argument")

    @staticmethod
    def _no_more(args: list[str], used: int) -> None:
        if len(args) > used:
            raise _LineError("EINVAL", "unknown arguments at the end")

    @staticmethod
    def _chunk_id(token: str) -> int:
        if not token.isdigit() or not token.isascii() or not 1 <= int(token) <= MAX_ID:
            raise _LineError("EINVAL", "invalid chunk id")
        return int(token)

    def _lookup(self, chunk_id: int) -> _Live:
        chunk = self.live.get(chunk_id)
        if chunk is None:
            raise _LineError("ENOENT", f"no chunk {chunk_id}")
        return chunk

    @staticmethod
    def _count(token: str) -> int:
        if not token.isdigit() or not token.isascii() or not 1 <= int(token) <= MAX_COUNT:
            raise _LineError("EINVAL", "invalid count")
        return int(token)

    @staticmethod
    def _pattern(token: str) -> int:
        value = parse_number(token, suffix=False)
        if value is None or value > 0xFFFFFFFF:
            raise _LineError("EINVAL", "invalid pattern")
        return value

    def _record(self, size: int, start: int) -> None:
        self._out_write(f"{self.live.add(start, size)}: {hex(size)}@{hex(start)}\n")

    # ------------------------------------------------------------------ commands
    def _alloc(self, command: str, args: list[str]) -> None:
        exact = len(args) == 2  # the usual case skips both count checks (order kept otherwise)
        if not exact:
            self._need(args, 2)
        token, request = args[0], args[1]
        if len(token) <= MAX_NAME and token.isascii():  # _split_dev's usual case, inline
            dev, slash, kind = token.rpartition("/")
            if not slash:
                dev, kind = token, ""
        else:
            dev, kind = _split_dev(token)
        if request.isdigit() and request.isascii() and request[0] != "0" and len(request) < 20:
            size, alignment = int(request), 0  # a plain decimal size: memparse's fast case
        else:
            size, alignment = _size_and_alignment(request)
        if not exact:
            self._no_more(args, 2)
        self.allocations += 1
        try:
            start = self.backend.alloc(dev, kind, size, alignment)
        except CmaError:
            self.failed_allocations += 1
            raise
        self._out_write(f"{self.live.add(start, size)}: {hex(size)}@{hex(start)}\n")

    def _alloc_from(self, command: str, args: list[str]) -> None:
        self._need(args, 2)
        size, alignment = _size_and_alignment(args[1])
        self._no_more(args, 2)
        self.allocations += 1
        try:
            start = self.backend.alloc_from(args[0], size, alignment)
        except CmaError:
            self.failed_allocations += 1
            raise
        self._record(size, start)

    def _free(self, command: str, args: list[str]) -> None:
        if args:
            token = args[0]
            if token.isdigit() and token.isascii() and len(token) < 11:  # _chunk_id, inline
                chunk_id = int(token)
                if not 1 <= chunk_id <= MAX_ID:
                    raise _LineError("EINVAL", "invalid chunk id")
            else:
                chunk_id = self._chunk_id(token)
            if len(args) > 1:
                self._no_more(args, 1)
            chunk = self.live.get(chunk_id)
            if chunk is None:
                raise _LineError("ENOENT", f"no chunk {chunk_id}")
        else:
            newest = self.live.newest()
            if newest is None:
                raise _LineError("ENOENT", "no chunks")
            chunk_id = newest
            chunk = self._lookup(chunk_id)
        self.backend.free(chunk.start)
        self.live.remove(chunk_id)

    def _list(self, command: str, args: list[str]) -> None:
        self._no_more(args, 0)
        for chunk_id, chunk in self.live.items():
            self.out.write(f"{chunk_id}: {chunk.size:#x}@{chunk.start:#x}\n")

    def _info(self, command: str, args: list[str]) -> None:
        self._need(args, 1)
        dev, kind = _split_dev(args[0])
        self._no_more(args, 1)
        info = self.backend.info(dev, kind)
        self.out.write(
            f"info: count={info.count} total={info.total_size:#x} free={info.free_size:#x} "
            f"lower={info.lower_bound:#x} upper={info.upper_bound:#x}\n"
        )

    def _memory_args(self, args: list[str]) -> tuple[_Live, int]:
        self._need(args, 2)
        chunk_id = self._chunk_id(args[0])
        pattern = self._pattern(args[1])
        self._no_more(args, 2)
        return self._lookup(chunk_id), pattern

    def _write(self, command: str, args: list[str]) -> None:
        chunk, pattern = self._memory_args(args)
        self.backend.write(chunk.start, chunk.size, pattern)

    def _verify(self, command: str, args: list[str]) -> None:
        chunk, pattern = self._memory_args(args)
        offset = self.backend.verify(chunk.start, chunk.size, pattern)
        if offset is not None:
            raise _LineError("EIO", f"mismatch at offset {offset:#x}")

    def _bench(self, command: str, args: list[str]) -> None:
        self._need(args, 3)
        count = self._count(args[0])
        dev, kind = _split_dev(args[1])
        size = parse_number(args[2])
        if size is None or size == 0:
            raise _LineError("EINVAL", "invalid size")
        self._no_more(args, 3)
        samples: list[float] = []
        for _ in range(count):  # the alloc round trip is timed; the free is not
            began = self.clock()
            start = self.backend.alloc(dev, kind, size, 0)
            samples.append(self.clock() - began)
            self.backend.free(start)
        self._timing("bench", samples)

    def _ping(self, command: str, args: list[str]) -> None:
        self._need(args, 1)
        count = self._count(args[0])
        self._no_more(args, 1)
        samples: list[float] = []
        for _ in range(count):
            began = self.clock()
            self.backend.ping()
            samples.append(self.clock() - began)
        self._timing("ping", samples)

    def _timing(self, name: str, samples: list[float]) -> None:
        self.out.write(
            f"{name}: n={len(samples)} p50={_percentile(samples, 0.5)}us "
            f"p99={_percentile(samples, 0.99)}us\n"
        )


#: Command name -> handler, shared by every runner. Plain functions rather than one runner's
#: bound methods: a dict of those would make each runner a reference cycle, freed only by the
#: cycle collector, so a replay's 100k live chunks would wait for a collection (at exit, a
#: tenth of a second) instead of going when the runner goes.
_COMMANDS: dict[str, Callable[[ScriptRunner, str, list[str]], None]] = {
    name: handler
    for names, handler in (
        (("alloc", "a"), ScriptRunner._alloc),
        (("alloc-from", "r"), ScriptRunner._alloc_from),
        (("free", "f"), ScriptRunner._free),
        (("list", "l"), ScriptRunner._list),
        (("info", "i"), ScriptRunner._info),
        (("write", "w"), ScriptRunner._write),
        (("verify", "v"), ScriptRunner._verify),
        (("bench", "b"), ScriptRunner._bench),
        (("ping", "p"), ScriptRunner._ping),
    )
    for name in names
}
