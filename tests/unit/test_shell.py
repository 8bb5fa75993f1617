"""GuestShell over a console that runs commands in a local POSIX shell (no QEMU): the same
command lines reach ``sh`` as reach the guest's busybox shell."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cma_qemu.errors import EIO
from cma_qemu.shell import GuestShell


class LocalConsole:
    """A console whose shell is the host's ``sh`` in one directory."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.lines: list[str] = []

    async def run(self, cmd: str, timeout: float = 30.0) -> tuple[str, int]:
        self.lines.append(cmd)
        res = await asyncio.to_thread(
            subprocess.run,
            ["sh", "-c", cmd],
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return (res.stdout + res.stderr).removesuffix("\n"), res.returncode

    async def converse(self, line: str | None, until: str | None, timeout: float = 30.0) -> str:
        self.lines.append(f"converse {line!r} until {until!r}")
        return "" if until is None else f"echo {line}\n"


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_run_is_a_subshell_and_check_names_the_failure(tmp_path: Path) -> None:
    shell = GuestShell(LocalConsole(tmp_path))
    assert run(shell.run("echo hi; exit 3")) == ("hi", 3)
    assert run(shell.run("echo still here")) == ("still here", 0)
    with pytest.raises(EIO, match=r"guest command 'cat /nope' exited with status 1: .*nope"):
        run(shell.check("cat /nope"))
    assert run(shell.check("echo ok")) == "ok"


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=3000))
def test_files_cross_the_console_byte_for_byte(tmp_path: Path, data: bytes) -> None:
    console = LocalConsole(tmp_path)
    shell = GuestShell(console)
    target = str(tmp_path / "f.bin")
    run(shell.put_file(target, data))
    assert (tmp_path / "f.bin").read_bytes() == data
    assert not (tmp_path / "f.bin.b64").exists()
    assert run(shell.get_file(target)) == data
    assert all(len(line) < 1024 for line in console.lines)  # short lines for the tty


def test_a_failed_copy_is_one_eio(tmp_path: Path) -> None:
    shell = GuestShell(LocalConsole(tmp_path))
    with pytest.raises(EIO, match="exited with status"):
        run(shell.put_file(str(tmp_path / "no-dir" / "f"), b"x"))
    with pytest.raises(EIO, match="exited with status"):
        run(shell.get_file(str(tmp_path / "missing")))


def test_a_stub_session_starts_talks_and_ends_with_ctrl_d(tmp_path: Path) -> None:
    console = LocalConsole(tmp_path)
    shell = GuestShell(console)

    async def session() -> list[tuple[str, str]]:
        async with shell.stub(timeout=5) as stub:
            await stub.send("alloc vpu/dec 1M")
            with pytest.raises(EIO, match="one line at a time"):
                await stub.send("a\nb")
            return stub.transcript

    transcript = asyncio.run(session())
    assert transcript == [("alloc vpu/dec 1M", "echo alloc vpu/dec 1M\n")]
    assert console.lines == [
        "converse 'cma-test' until 'cma-test> '",
        "converse 'alloc vpu/dec 1M' until 'cma-test> '",
        "converse '\\x04' until None",
        "true",
    ]
