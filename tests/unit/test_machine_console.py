"""The console driver against a real host shell under pexpect (no QEMU needed)."""

from __future__ import annotations

from collections.abc import Iterator

import pexpect
import pytest

from cma_qemu.errors import EIO, ETIMEDOUT
from cma_qemu.machine.console import READY_RE, Console, Transcript

BOOT = (
    "echo 'booting...'; sleep 0.2; echo 'cma-qemu: ready channel=/dev/vport0p1'; "
    "PS1='cma# ' exec sh -i"
)


@pytest.fixture
def console() -> Iterator[Console]:
    child = pexpect.spawn("sh", ["-c", BOOT], encoding="utf-8", echo=True, timeout=None)
    con = Console(child)
    try:
        yield con
    finally:
        con.close()
        child.close(force=True)


async def test_ready_and_exact_runs(console: Console) -> None:
    assert await console.wait_ready(10, prepare=False) == "/dev/vport0p1"
    assert "booting..." in console.boot_log
    assert await console.run("echo hello") == ("hello", 0)
    assert await console.run("printf 'a\\nb\\n'; false") == ("a\nb", 1)
    assert await console.run("printf 'no newline'") == ("no newline", 0)
    assert await console.run("(exit 42)") == ("", 42)
    # quotes, semicolons and a trailing ; survive the eval wrapper
    assert await console.run("""echo "it's"; echo '$HOME';""") == ("it's\n$HOME", 0)
    # the echoed command line never leaks into the output
    out, _ = await console.run("echo __CMA_E_fake_0__")
    assert out == "__CMA_E_fake_0__"
    assert await console.check("echo ok") == "ok"
    with pytest.raises(EIO, match="exited with status 3"):
        await console.check("exit_with() { return 3; }; exit_with")
    assert "hello" in console.log


async def test_another_runs_markers_are_output(console: Console) -> None:
    """Markers with a tag not this run's (printed by the command) are plain output."""
    await console.wait_ready(10, prepare=False)
    foreign = "__CMA_B_0123456789abcdef__\n__CMA_E_0123456789abcdef_7__\nafter"
    assert await console.run(f"printf '{foreign}'; (exit 3)") == (foreign, 3)
    assert await console.run("echo __CMA_E_fedcba9876543210_1__; echo x") == (
        "__CMA_E_fedcba9876543210_1__\nx",
        0,
    )
    # a begin marker of another run before this run's own is skipped with the echoed line
    console._child.sendline("echo __CMA_B_''0123456789abcdef__")
    assert await console.run("echo mine") == ("mine", 0)


async def test_converse_returns_text_before_a_literal_prompt(console: Console) -> None:
    """``until`` is plain text: regex characters in a program's prompt match themselves."""
    await console.wait_ready(10, prepare=False)
    await console.run("stty -echo")
    out = await console.converse("printf 'one\\ntwo (x+y)* > '", "(x+y)* > ", 5)
    assert out.endswith("one\ntwo ")
    assert await console.converse(None, None) == ""
    assert await console.run("echo back") == ("back", 0)


async def test_second_ready_marker_after_a_reboot(console: Console) -> None:
    """A marker already read by someone else (a run, the drain thread) still counts once."""
    assert await console.wait_ready(10, prepare=False) == "/dev/vport0p1"
    mark = console.mark()
    await console.run("echo 'cma-qemu: ready channel=/dev/two'")
    assert await console.wait_ready(5, prepare=False) == "/dev/two"
    assert "channel=/dev/two" in console.boot_log and "booting..." not in console.boot_log
    with pytest.raises(ETIMEDOUT):
        await console.wait_ready(0.3, prepare=False)
    assert await console.wait_ready(1, prepare=False, since=mark) == "/dev/two"


async def test_timeout_names_last_lines(console: Console) -> None:
    await console.wait_ready(10, prepare=False)
    with pytest.raises(ETIMEDOUT) as err:
        await console.run("echo before-sleep; sleep 5", timeout=0.5)
    assert "last console lines" in str(err.value)
    assert "before-sleep" in str(err.value)


async def test_ready_timeout_and_eof() -> None:
    child = pexpect.spawn("sh", ["-c", "echo kernel panic; sleep 5"], encoding="utf-8")
    con = Console(child)
    try:
        with pytest.raises(ETIMEDOUT, match="kernel panic"):
            await con.wait_ready(0.5, prepare=False)
    finally:
        child.close(force=True)
    child = pexpect.spawn("sh", ["-c", "echo qemu-system-arm: bad option"], encoding="utf-8")
    con = Console(child)
    try:
        with pytest.raises(EIO, match="QEMU closed the console"):
            await con.wait_ready(5, prepare=False)
    finally:
        child.close(force=True)


def test_ready_regex_waits_for_end_of_line() -> None:
    assert READY_RE.search("cma-qemu: ready channel=/dev") is None
    m = READY_RE.search("cma-qemu: ready channel=/dev/ttySAC1\r\r\n")
    assert m is not None and m.group(1) == "/dev/ttySAC1"


def test_transcript_is_bounded() -> None:
    t = Transcript(limit=10)
    for i in range(10):
        t.write(f"line{i}\r\n")
    assert "line9" in t.text() and "line0" not in t.text()
    assert t.tail(1) == ["line9"]


class _TypingChild:
    """Records what is typed; the guest's FIFO level drains by ``rate`` per level read."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.level = 0
        self.peak = 0
        self.sent: list[str] = []
        self.logfile_read: object = None

    def send(self, s: str) -> int:
        self.sent.append(s)
        self.level += len(s)
        self.peak = max(self.peak, self.level)
        return len(s)

    def read_level(self) -> int:
        self.level = max(0, self.level - self.rate)
        return self.level


def test_paced_typing_waits_for_the_uart_fifo() -> None:
    child = _TypingChild(rate=4)
    typed = Console(child, pacing=(16, 0.0), fifo_level=child.read_level)  # type: ignore[arg-type]
    line = "echo " + "x" * 300
    typed._sendline(line)
    assert "".join(child.sent) == line + "\n"
    assert max(len(piece) for piece in child.sent) == 16
    assert child.peak <= 63  # a FIFO filled to 64 is what QEMU 7.2 loses
