"""The guest's serial console, driven through pexpect.

QEMU's first serial port is its stdio, and pexpect owns the pty behind it. The guest init
prints ``cma-qemu: ready channel=NAME`` once the channel device exists, then runs a shell with
the prompt ``cma# ``.

:meth:`Console.run` gives exact output and exit status: the command goes through
``eval`` between two markers that carry a fresh tag, and the markers are written with an empty
``''`` inside the tag so the echoed command line can never match them (whether or not the tty
echoes). After the ready marker the console is put in ``stty -echo`` (busybox then reads lines
without its line editor, so nothing is redrawn) and ``dmesg -n 1`` (kernel messages stay in
``dmesg`` instead of interleaving with command output).

A daemon thread drains the console between commands: QEMU writes serial output with a
blocking write, so a guest that prints while nobody reads the pty would stall QEMU's main
loop, QMP included.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import pexpect

from cma_qemu.errors import EIO, ETIMEDOUT

__all__ = ["PROMPT", "READY_RE", "Console", "Transcript", "require_success"]

#: The guest init's ready line; group 1 is the channel the guest found.
READY_RE = re.compile(r"cma-qemu: ready channel=(\S+?)\r*\n")
#: The guest shell's prompt.
PROMPT = "cma# "
#: The begin and end markers :meth:`Console.run_sync` puts around a command. Group 1 is the
#: run's tag, compared after the match, so one compiled pattern serves every run.
_BEGIN_RE = re.compile(r"__CMA_B_([0-9a-f]{16})__\r*\n")
_END_RE = re.compile(r"__CMA_E_([0-9a-f]{16})_(\d+)__")
#: How many characters of console output the transcript keeps (the boot log is kept apart).
TRANSCRIPT_LIMIT = 1 << 20


def require_success(cmd: str, output: str, status: int) -> str:
    """``output`` when ``status`` is 0; else EIO naming the command, its status and output.

    The one check that a guest command succeeded: the console's, the guest shell's and the
    pytest plugin's.
    """
    if status != 0:
        raise EIO(f"guest command {cmd!r} exited with status {status}: {output}", where="guest")
    return output


class Transcript:
    """Everything the console printed: a pexpect ``logfile_read`` with a bounded memory."""

    def __init__(self, limit: int = TRANSCRIPT_LIMIT) -> None:
        self._chunks: deque[str] = deque()
        self._size = 0
        self._dropped = 0
        self._limit = limit
        self._lock = threading.Lock()

    def write(self, data: str) -> None:
        with self._lock:
            self._chunks.append(data)
            self._size += len(data)
            while self._size > self._limit and len(self._chunks) > 1:
                old = len(self._chunks.popleft())
                self._size -= old
                self._dropped += old

    @property
    def total(self) -> int:
        """Characters ever written: a position that :meth:`since` understands."""
        with self._lock:
            return self._dropped + self._size

    def since(self, pos: int) -> tuple[int, str]:
        """``(start, raw text)`` written from position ``pos`` on (or the oldest retained)."""
        with self._lock:
            start = max(pos, self._dropped)
            return start, "".join(self._chunks)[start - self._dropped :]

    def flush(self) -> None:
        """Part of the file protocol pexpect expects; nothing is buffered."""

    def text(self) -> str:
        """The retained output with CRs removed."""
        with self._lock:
            return "".join(self._chunks).replace("\r", "")

    def tail(self, lines: int = 20) -> list[str]:
        """The last ``lines`` non-empty lines (for error messages)."""
        return [ln for ln in self.text().splitlines() if ln.strip()][-lines:]


class _Child(Protocol):
    """The subset of ``pexpect.spawn`` the console uses (fakes implement this in tests)."""

    before: Any
    match: Any
    logfile_read: Any

    def expect(self, pattern: Any, timeout: float | None = ...) -> int: ...
    def expect_exact(self, pattern: Any, timeout: float | None = ...) -> int: ...
    def sendline(self, s: str = ...) -> int: ...
    def send(self, s: str) -> int: ...
    def read_nonblocking(self, size: int = ..., timeout: float | None = ...) -> Any: ...
    def isalive(self) -> bool: ...


class Console:
    """The guest console of one machine: ready marker, exact command runs, interactive mode."""

    def __init__(
        self,
        child: _Child,
        *,
        transcript: Transcript | None = None,
        pacing: tuple[int, float] | None = None,
        fifo_level: Callable[[], int] | None = None,
    ) -> None:
        self._child = child
        self._pacing = pacing
        self._fifo_level = fifo_level
        self.transcript = transcript or Transcript()
        child.logfile_read = self.transcript
        self._lock = threading.RLock()
        self._boot_log: str | None = None
        self._ready_mark = 0
        self.channel: str | None = None
        self._pump: threading.Thread | None = None
        self._stop = threading.Event()

    # -- logs ---------------------------------------------------------------------------------

    @property
    def boot_log(self) -> str:
        """Console output of the last boot, up to its ready marker (all output before one)."""
        return self._boot_log if self._boot_log is not None else self.transcript.text()

    @property
    def log(self) -> str:
        """All retained console output, CRs removed."""
        return self.transcript.text()

    def tail(self, lines: int = 20) -> str:
        """The last console lines, formatted for an error message."""
        return "\n".join(f"  | {ln}" for ln in self.transcript.tail(lines))

    def _error(self, cls: type[EIO] | type[ETIMEDOUT], what: str) -> EIO | ETIMEDOUT:
        tail = self.tail()
        return cls(f"{what}; last console lines:\n{tail}" if tail else what, where="console")

    def _expect(self, pattern: Any, timeout: float, what: str, *, exact: bool = False) -> int:
        """pexpect's ``expect`` (``expect_exact`` for plain text), its errors as ours."""
        try:
            if exact:
                return self._child.expect_exact(pattern, timeout=timeout)
            return self._child.expect(pattern, timeout=timeout)
        except pexpect.TIMEOUT:
            raise self._error(ETIMEDOUT, f"{what}: no answer in {timeout:g} s") from None
        except pexpect.EOF:
            raise self._error(EIO, f"{what}: QEMU closed the console (it exited)") from None

    def _sendline(self, line: str) -> None:
        """Type a line; in bursts of ``pacing[0]`` characters when the UART drops bursts.

        QEMU's Exynos4210 UART loses what arrives beyond its receive FIFO while the guest is
        still draining it, so a long command line typed at once arrives mangled.
        """
        if self._pacing is None:
            self._child.sendline(line)
            return
        burst, interval = self._pacing
        data = line + "\n"
        for offset in range(0, len(data), burst):
            self._wait_for_fifo(burst)
            self._child.send(data[offset : offset + burst])
            time.sleep(interval)

    def _wait_for_fifo(self, burst: int, fifo_size: int = 64) -> None:
        """With ``fifo_level``: hold the next burst until the guest's FIFO has room for three.

        One burst may still sit in the pty and one is about to go, so a level of at most
        ``fifo_size - 1 - 2 * burst`` keeps the FIFO from ever holding ``fifo_size`` bytes (which
        QEMU 7.2's Exynos UART loses whole). A level that stops moving gets the burst anyway
        while it still fits: new bytes raise the receive interrupt the guest missed.
        """
        if self._fifo_level is None:
            return
        limit = fifo_size - 1 - 2 * burst
        last, since = -1, time.monotonic()
        while True:
            level = self._fifo_level()
            if level <= limit:
                return
            now = time.monotonic()
            if level != last:
                last, since = level, now
            elif now - since > 0.05 and level + burst < fifo_size:
                return
            elif now - since > 5:
                return  # nobody reads the console; sending is all that is left
            time.sleep(0.001)

    # -- ready --------------------------------------------------------------------------------

    def mark(self) -> int:
        """The current transcript position; output after it counts for the next ready wait."""
        return self.transcript.total

    def wait_ready_sync(
        self, timeout: float = 60.0, *, prepare: bool = True, since: int | None = None
    ) -> str:
        """Block until a ready marker printed after ``since``; returns the guest's channel.

        By default ``since`` is the end of the previous ready marker, so after a guest reboot
        the same call waits for the new boot. The transcript is searched rather than pexpect's
        buffer because the drain thread may already have read the marker.
        """
        what = "waiting for the guest's ready marker"
        deadline = time.monotonic() + timeout
        pos = self._ready_mark if since is None else since
        with self._lock:
            while True:
                start, text = self.transcript.since(pos)
                m = READY_RE.search(text)
                if m is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._error(ETIMEDOUT, f"{what}: no answer in {timeout:g} s")
                try:
                    self._child.read_nonblocking(65536, timeout=min(left, 0.2))
                except pexpect.TIMEOUT:
                    pass
                except (pexpect.EOF, OSError, ValueError):
                    raise self._error(EIO, f"{what}: QEMU closed the console (it exited)") from None
            self.channel = m.group(1)
            self._ready_mark = start + m.end()
            self._boot_log = text[: m.end()].replace("\r", "")
            if prepare:
                self.run_sync("stty -echo; dmesg -n 1", timeout=max(deadline - time.monotonic(), 5))
        self.start_pump()
        return self.channel

    async def wait_ready(
        self, timeout: float = 60.0, *, prepare: bool = True, since: int | None = None
    ) -> str:
        """Async :meth:`wait_ready_sync` (runs in a thread, so QMP events keep flowing)."""
        return await asyncio.to_thread(self.wait_ready_sync, timeout, prepare=prepare, since=since)

    # -- commands -----------------------------------------------------------------------------

    def run_sync(self, cmd: str, timeout: float = 30.0) -> tuple[str, int]:
        """Run one shell command line in the guest; ``(output, exit status)``, CRs stripped."""
        tag = uuid.uuid4().hex[:16]
        line = f"echo __CMA_B_''{tag}__; eval {shlex.quote(cmd)}; echo __CMA_E_''{tag}_$?__"
        what = f"running {cmd!r} in the guest"
        with self._lock:
            self._sendline(line)
            # Another run's markers (one that timed out, or printed by the command) are
            # skipped before the begin marker and are part of the output after it.
            self._expect(_BEGIN_RE, timeout, what)
            while self._child.match.group(1) != tag:
                self._expect(_BEGIN_RE, timeout, what)
            out = ""
            self._expect(_END_RE, timeout, what)
            while self._child.match.group(1) != tag:
                out += str(self._child.before) + str(self._child.match.group(0))
                self._expect(_END_RE, timeout, what)
            status = int(self._child.match.group(2))
            out = (out + str(self._child.before)).replace("\r", "")
        return out.removesuffix("\n"), status

    async def run(self, cmd: str, timeout: float = 30.0) -> tuple[str, int]:
        """Async :meth:`run_sync`."""
        return await asyncio.to_thread(self.run_sync, cmd, timeout)

    async def check(self, cmd: str, timeout: float = 30.0) -> str:
        """Output of ``cmd``; EIO naming the command and its status if it fails."""
        return require_success(cmd, *await self.run(cmd, timeout))

    def converse_sync(self, line: str | None, until: str | None, timeout: float = 30.0) -> str:
        """Type ``line`` (None: type nothing) and return the output before the text ``until``
        (None: do not wait; returns "").

        For programs with a prompt of their own (``cma-test`` on a terminal prints
        ``cma-test> ``), where the shell's begin/end markers of :meth:`run_sync` do not apply.
        """
        what = f"waiting for {until!r} in the guest"
        with self._lock:
            if line is not None:
                self._sendline(line)
            if until is None:
                return ""
            self._expect(until, timeout, what, exact=True)
            return str(self._child.before).replace("\r", "")

    async def converse(self, line: str | None, until: str | None, timeout: float = 30.0) -> str:
        """Async :meth:`converse_sync`."""
        return await asyncio.to_thread(self.converse_sync, line, until, timeout)

    # -- interactive --------------------------------------------------------------------------

    def interact(self, escape_character: str = "\x1d") -> None:
        """Hand the console to the user's terminal until they press Ctrl-] (the CLI's mode)."""
        with self._lock:
            with contextlib.suppress(EIO, ETIMEDOUT):
                self.run_sync("stty echo", timeout=10)
            try:
                self._child.sendline("")
                interact = self._child.interact  # type: ignore[attr-defined]
                interact(escape_character=escape_character)
            finally:
                with contextlib.suppress(EIO, ETIMEDOUT):
                    self.run_sync("stty -echo", timeout=10)

    # -- draining -----------------------------------------------------------------------------

    def start_pump(self) -> None:
        """Start draining unsolicited output in the background (idempotent)."""
        if self._pump is None:
            self._pump = threading.Thread(target=self._drain, name="cma-console", daemon=True)
            self._pump.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            if not self._lock.acquire(timeout=0.2):
                continue
            try:
                self._child.read_nonblocking(65536, timeout=0.05)
            except pexpect.TIMEOUT:
                pass
            except (pexpect.EOF, OSError, ValueError):
                return
            finally:
                self._lock.release()
            self._stop.wait(0.02)

    def drain(self, timeout: float = 1.0) -> None:
        """Read whatever QEMU still has to say (until EOF or ``timeout``) into the transcript.

        Used on failures: the transcript only holds what was read, and QEMU's last words (an
        option error, a guest panic) are what makes the error message useful.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    self._child.read_nonblocking(65536, timeout=min(left, 0.1))
                except pexpect.TIMEOUT:
                    continue
                except (pexpect.EOF, OSError, ValueError):
                    return

    def close(self) -> None:
        """Stop the drain thread (the machine closes the pexpect child itself)."""
        self._stop.set()
        if self._pump is not None and self._pump is not threading.current_thread():
            self._pump.join(timeout=2)
