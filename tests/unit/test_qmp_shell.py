"""``qmp-shell`` (the one qemu.qmp installs) against the real monitor, through pexpect.

No QEMU is needed: the monitor serves a framework of its own on a Unix socket from an event
loop thread, and a real ``qmp-shell`` process talks to it, in QMP mode and in HMP mode
(``-H``, which goes through ``human-monitor-command``), tab completion included.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from cma_qemu.framework import Cma
from cma_qemu.monitor import Monitor

QMP_SHELL = Path(sys.executable).with_name("qmp-shell")
PROMPT = "(QEMU) "
MiB = 1 << 20


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Monitor, Path]]:
    """A monitor over a fresh framework, served from a loop thread (qmp-shell blocks)."""
    cma = Cma.from_attributes(
        regions="video=16M;common=32M",
        map="vpu/*=video",
        asterisk=None,
        ram=[(0x40000000, 1 << 29)],
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="monitor-loop", daemon=True)
    thread.start()
    monitor = Monitor(cma)
    path = tmp_path / "run" / "monitor.sock"
    try:
        asyncio.run_coroutine_threadsafe(monitor.start(path), loop).result(10)
        yield monitor, path
    finally:
        asyncio.run_coroutine_threadsafe(monitor.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert not path.exists()


class Shell:
    """One qmp-shell process: send a line, get what it printed before the next prompt."""

    def __init__(self, socket: Path, home: Path, *options: str) -> None:
        # qmp-shell keeps its history in ~/.qmp-shell_history: a HOME of the test's own
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "dumb", "HOME": str(home)}
        self.child = pexpect.spawn(
            str(QMP_SHELL), [*options, str(socket)], encoding="utf-8", timeout=20, env=env
        )
        self.child.expect_exact(PROMPT)
        self.banner = self.text(self.child.before)

    @staticmethod
    def text(output: str | None) -> str:
        return (output or "").replace("\r", "")

    def send(self, line: str) -> str:
        """Type ``line`` (a tab in it completes) and Enter; the output without the echo."""
        self.child.send(line + "\r")
        self.child.expect_exact(PROMPT)
        echo, _, out = self.text(self.child.before).partition("\n")
        self.last_echo = echo
        return out

    def json(self, line: str) -> Any:
        return json.loads(self.send(line))

    def close(self) -> int | None:
        self.child.sendeof()
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


@pytest.fixture
def shell(served: tuple[Monitor, Path], tmp_path: Path) -> Iterator[Shell]:
    sh = Shell(served[1], tmp_path)
    yield sh
    assert sh.close() == 0


@pytest.fixture
def hmp_shell(served: tuple[Monitor, Path], tmp_path: Path) -> Iterator[Shell]:
    sh = Shell(served[1], tmp_path, "-H")
    yield sh
    assert sh.close() == 0


def test_banner_shows_the_package_version(shell: Shell) -> None:
    major, minor, micro = importlib.metadata.version("cma-qemu").split(".")[:3]
    assert shell.banner.splitlines()[:2] == [
        "Welcome to the QMP low-level shell!",
        f"Connected to QEMU {major}.{minor}.{micro}",
    ]
    reply = shell.json("query-version")
    assert reply["return"]["package"] == f"cma-qemu {importlib.metadata.version('cma-qemu')}"


def test_qmp_mode_commands_completion_and_errors(
    shell: Shell, served: tuple[Monitor, Path]
) -> None:
    monitor, _ = served
    regions = shell.json("query-cma-reg\t")  # completed from query-commands
    assert shell.last_echo == "query-cma-regions"
    assert [r["name"] for r in regions["return"]] == [r.name for r in monitor.cma.regions]

    chunk = shell.json("cma-alloc dev=vpu kind=dec size=1048576")["return"]
    assert chunk["region"] == "video" and chunk["owner"] == "monitor"
    assert [c.start for c in monitor.cma.chunks] == [chunk["addr"]]

    error = shell.json("cma-alloc dev=vpu size=1073741824")["error"]
    assert error["class"] == "ENOMEM"
    error = shell.json("cma-alloc dev=vpu size=big")["error"]
    assert error == {
        "class": "GenericError",
        "desc": "cma-alloc: argument 'size': expected an unsigned integer, got \"big\"",
    }
    assert len(monitor.cma.chunks) == 1  # the failures changed nothing

    schema = shell.json("query-qmp-schema")["return"]
    assert {"name": "cma-alloc", "meta-type": "command"}.items() <= next(
        e for e in schema if e["name"] == "cma-alloc"
    ).items()
    assert shell.json(f"cma-free addr={chunk['addr']}")["return"]["addr"] == chunk["addr"]
    assert monitor.cma.chunks == []


def test_hmp_mode(hmp_shell: Shell, served: tuple[Monitor, Path]) -> None:
    monitor, _ = served
    assert hmp_shell.banner.splitlines()[0] == "Welcome to the HMP shell!"
    assert hmp_shell.send("help").splitlines()[1].startswith("info [subcommand] -- ")

    table = hmp_shell.send("info cma").splitlines()
    assert table[0].split()[:3] == ["name", "start", "end"]
    assert sorted(line.split()[0] for line in table[1:3]) == ["common", "video"]
    assert hmp_shell.send("info chunks").strip() == "no live chunks"

    held = monitor.cma.alloc("vpu", "", 2 * MiB, 0, owner="guest")
    rows = hmp_shell.send("info chu\t").splitlines()  # completed from 'info'
    assert hmp_shell.last_echo == "info chunks"
    assert rows[1].split() == [f"{held.start:#x}", "2M", "video", "guest", "1"]

    version = importlib.metadata.version("cma-qemu")
    assert hmp_shell.send("info version").strip() == f"{version} (cma-qemu)"
    assert hmp_shell.send("stop").strip() == "unknown command: 'stop'"
