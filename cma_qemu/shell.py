"""A shell on a guest console: commands, files, and ``cma-test`` scripts or sessions.

Like labgrid's ShellDriver on a console: it needs only a console that runs one command line
with exact output and exit status (:meth:`ShellConsole.run`) and can converse with a program
that has a prompt of its own (:meth:`ShellConsole.converse`);
:class:`cma_qemu.machine.console.Console` is one. Files go as base64 text in short lines, so
they cross a tty unchanged and work on every board.
"""

from __future__ import annotations

import base64
import contextlib
import re
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from cma_qemu.errors import EIO
from cma_qemu.machine.console import require_success

__all__ = ["GuestShell", "GuestStub", "ScriptResult", "ShellConsole"]

_GUEST_SCRIPT = "/tmp/cma-script"
_STUB_PROMPT = "cma-test> "
_B64_LINE = 512  # well under the tty's 4095-byte canonical line


class ShellConsole(Protocol):
    """What a shell needs of a console."""

    async def run(self, cmd: str, timeout: float = 30.0) -> tuple[str, int]:
        """One command line in the guest's shell: (output, exit status)."""
        ...

    async def converse(self, line: str | None, until: str | None, timeout: float = 30.0) -> str:
        """Type ``line`` and return the output before the text ``until``."""
        ...


@dataclass(frozen=True)
class ScriptResult:
    """What ``cma-test`` printed in the guest for one script, and its exit status."""

    stdout: str
    stderr: str
    status: int


class GuestStub:
    """``cma-test`` running interactively on the guest console, holding its chunks.

    A script run ends with the stub's exit, which frees everything; a held stub keeps its
    chunks alive between :meth:`send` calls, so the host can look at them meanwhile.
    """

    def __init__(self, console: ShellConsole, timeout: float) -> None:
        self._console = console
        self.timeout = timeout
        self.transcript: list[tuple[str, str]] = []

    async def start(self) -> None:
        """Start the stub and wait for its first prompt."""
        await self._console.converse("cma-test", _STUB_PROMPT, self.timeout)

    async def send(self, line: str) -> str:
        """One line to the stub; what it printed (stdout and stderr, as on a terminal)."""
        if "\n" in line:
            raise EIO("send one line at a time", where="cma-test")
        out = str(await self._console.converse(line, _STUB_PROMPT, self.timeout))
        self.transcript.append((line, out))
        return out

    async def close(self) -> None:
        """End of input (Ctrl-D): the stub frees what it holds and exits."""
        await self._console.converse("\x04", None, self.timeout)
        await self._console.run("true", self.timeout)  # back in step with the shell


class GuestShell:
    """Commands, files and ``cma-test`` on a guest console (one console round trip each)."""

    def __init__(self, console: ShellConsole) -> None:
        self.console = console

    async def run(self, cmd: str, timeout: float = 60.0) -> tuple[str, int]:
        """Run a shell command in the guest: (output, exit status).

        It runs in a subshell, so ``exit 3`` gives status 3 instead of ending the guest's shell.
        """
        out, status = await self.console.run(f"( eval {shlex.quote(cmd)} )", timeout)
        return str(out), int(status)

    async def check(self, cmd: str, timeout: float = 60.0) -> str:
        """Output of a command that must succeed (EIO with its status and output if not)."""
        return require_success(cmd, *await self.run(cmd, timeout))

    async def put_file(self, path: str, data: bytes) -> None:
        """Copy bytes into a guest file over the console (base64, one round trip per 384 B)."""
        encoded = base64.b64encode(data).decode("ascii")
        await self.check(f": > {path}.b64")
        for offset in range(0, len(encoded), _B64_LINE):
            await self.check(f"echo {encoded[offset : offset + _B64_LINE]} >> {path}.b64")
        await self.check(f"base64 -d {path}.b64 > {path} && rm {path}.b64")

    async def get_file(self, path: str) -> bytes:
        """A guest file's exact bytes (base64 over the console, so no tty translation)."""
        encoded = await self.check(f"base64 {path}")
        return base64.b64decode(re.sub(r"\s+", "", encoded))

    async def run_script(self, text: str, timeout: float = 120.0) -> ScriptResult:
        """Run a script with ``cma-test`` in the guest; its exact stdout and stderr."""
        await self.put_file(_GUEST_SCRIPT, text.encode("utf-8", "surrogateescape"))
        _, status = await self.run(
            f"cma-test < {_GUEST_SCRIPT} > {_GUEST_SCRIPT}.out 2> {_GUEST_SCRIPT}.err", timeout
        )
        out = await self.get_file(f"{_GUEST_SCRIPT}.out")
        err = await self.get_file(f"{_GUEST_SCRIPT}.err")
        return ScriptResult(
            out.decode("utf-8", "surrogateescape"), err.decode("utf-8", "surrogateescape"), status
        )

    @contextlib.asynccontextmanager
    async def stub(self, timeout: float = 60.0) -> AsyncIterator[GuestStub]:
        """``async with shell.stub() as stub: await stub.send("alloc vpu/dec 1M")``."""
        stub = GuestStub(self.console, timeout)
        await stub.start()
        try:
            yield stub
        finally:
            await stub.close()
