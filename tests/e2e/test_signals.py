"""The agent under SIGTERM, SIGHUP and SIGKILL: what it leaves behind (nothing) and how fast.

Each scenario runs the real CLI (or pytest with the plugin) as a subprocess, finds the QEMU
it launched in the process tree, signals one of them and polls until the agent, QEMU and
every file of the run are gone. The seconds each took are printed (``-s`` shows them) as
``signals: SCENARIO: ...`` lines; RELIABILITY.md quotes them. Guest RAM is an anonymous memfd,
so "RAM gone" means: no process holds it any more (QEMU and the agent have both exited), and
nothing new appeared in /dev/shm.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pexpect
import pytest
from machine_helpers import guest_image

from cma_qemu.boards import load_board
from cma_qemu.configuration import build_cma
from cma_qemu.first_json import read_first_json
from cma_qemu.machine import rundir
from cma_qemu.machine.devicetree import add_reserved_memory, dump_qemu_dtb
from cma_qemu.machine.launch import LaunchFiles, machine_args, qemu_command

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
CLI = str(BIN / "cma-qemu")
SHM = Path("/dev/shm")
ENV = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}  # runtime dirs in /tmp
TMP = Path(tempfile.gettempdir())
BOOT_TIMEOUT = 180.0
GONE_TIMEOUT = 30.0


# -------------------------------------------------------------------------- processes
def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.rstrip(b"\0").decode(errors="replace").split("\0") if raw else []


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def _find_qemu(pid: int) -> tuple[int, list[str]] | None:
    """The booting QEMU under ``pid`` (not a short ``dumpdtb`` run): pid and argv."""
    for child in _descendants(pid):
        argv = _cmdline(child)
        if argv and "qemu-system-arm" in argv[0] and "-qmp" in argv:
            return child, argv
    return None


def _option(argv: list[str], pattern: str) -> str:
    match = re.search(pattern, " ".join(argv))
    assert match is not None, (pattern, argv)
    return match.group(1)


def _owner_pid(directory: Path) -> int | None:
    try:
        return int((directory / rundir.OWNER_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _shm() -> set[Path]:
    return set(SHM.glob("cma-qemu-*"))


def _new_shm(before: set[Path]) -> set[Path]:
    """RAM files in /dev/shm since ``before`` that no running process names (another test
    session, or an older version, may be booting a board meanwhile)."""
    names = " ".join(" ".join(_cmdline(int(p.name))) for p in Path("/proc").glob("[0-9]*"))
    return {p for p in _shm() - before if p.exists() and str(p) not in names}


@dataclass
class Agent:
    """A ``cma-qemu`` (or pytest) process and the QEMU, files and RAM of its board."""

    proc: subprocess.Popen[str]
    shm_before: set[Path]
    info: dict[str, Any] = field(default_factory=dict)
    qemu_pid: int = 0
    qemu_argv: list[str] = field(default_factory=list)

    @property
    def runtime_dir(self) -> Path:
        return Path(_option(self.qemu_argv, r"-qmp unix:([^,]+)")).parent

    @property
    def ram_path(self) -> str:
        return _option(self.qemu_argv, r"mem-path=([^,]+)")

    def wait_for_qemu(self, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = _find_qemu(self.proc.pid)
            if found is not None:
                self.qemu_pid, self.qemu_argv = found
                return
            time.sleep(0.05)
        raise AssertionError(f"no QEMU under {self.proc.args!r}: {self.proc.poll()}")

    def check_running(self) -> None:
        """While the board runs: its RAM has no name on any file system."""
        assert self.ram_path == f"/proc/{self.proc.pid}/fd/{self.ram_path.rsplit('/', 1)[1]}"
        assert os.readlink(self.ram_path).startswith("/memfd:cma-qemu-")
        assert self.runtime_dir.is_dir() and (self.runtime_dir / rundir.OWNER_FILE).is_file()
        assert _new_shm(self.shm_before) == set()

    def files(self) -> list[Path]:
        paths = [self.runtime_dir]
        paths += [Path(str(self.info[k])) for k in ("monitor", "qmp", "channel") if k in self.info]
        return paths

    def kill(self) -> None:
        for pid in (self.proc.pid, self.qemu_pid):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def boot_sleeping() -> Iterator[Callable[[], Agent]]:
    """``cma-qemu boot virt --json --run "sleep 60"``, served and in its sleep."""
    started: list[Agent] = []

    def start() -> Agent:
        shm = _shm()
        proc = subprocess.Popen(
            [CLI, "boot", "virt", "--json", "--run", "sleep 60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        agent = Agent(proc, shm)
        started.append(agent)
        agent.info = read_first_json(proc, BOOT_TIMEOUT)
        agent.wait_for_qemu()
        agent.check_running()
        time.sleep(0.5)  # the guest is in its `sleep 60`
        return agent

    yield start
    for agent in started:
        agent.kill()


def _until(what: str, condition: Callable[[], bool], t0: float) -> float:
    """Seconds from ``t0`` until ``condition`` holds (fails after GONE_TIMEOUT)."""
    return _watch(t0, {what: condition})[what]


def _watch(t0: float, conditions: dict[str, Callable[[], bool]]) -> dict[str, float]:
    """Seconds from ``t0`` until each condition first held, all polled in one loop in the
    given order (so a condition listed later is seen at the same instant, if it held then)."""
    seen: dict[str, float] = {}
    while len(seen) < len(conditions):
        now = time.monotonic() - t0
        for what, condition in conditions.items():
            if what not in seen and condition():
                seen[what] = now
        missing = set(conditions) - set(seen)
        assert now < GONE_TIMEOUT, f"{', '.join(missing)}: not after {GONE_TIMEOUT} s"
        time.sleep(0.01)
    return seen


def _report(scenario: str, **seconds: float) -> None:
    figures = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in seconds.items())
    print(f"\nsignals: {scenario}: {figures}")


def _gone(paths: list[Path]) -> Callable[[], bool]:
    return lambda: not any(p.exists() for p in paths)


# -------------------------------------------------------------------------- boot
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_boot_stops_cleanly_on(signum: signal.Signals, boot_sleeping: Callable[[], Agent]) -> None:
    agent = boot_sleeping()
    files = agent.files()
    assert all(p.exists() for p in files)

    t0 = time.monotonic()
    agent.proc.send_signal(signum)
    seen = _watch(
        t0,
        {
            "agent exit": lambda: agent.proc.poll() is not None,
            "QEMU gone": lambda: not _alive(agent.qemu_pid),
            "files gone": _gone(files),
        },
    )

    _, stderr = agent.proc.communicate(timeout=10)
    assert agent.proc.returncode == 128 + signum
    assert stderr == f"cma-qemu: terminated by {signum.name}\n"
    assert not _alive(agent.qemu_pid) and _gone(files)() and _new_shm(agent.shm_before) == set()
    # the agent removed them itself: they were gone when it had exited
    assert seen["QEMU gone"] <= seen["agent exit"] and seen["files gone"] <= seen["agent exit"]
    _report(f"boot, agent {signum.name}", **{k.replace(" ", "_"): v for k, v in seen.items()})


def test_demo_stops_cleanly_on_sigterm() -> None:
    shm = _shm()
    proc = subprocess.Popen(
        [CLI, "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    agent = Agent(proc, shm)
    try:
        agent.wait_for_qemu()
        files = agent.files()
        assert proc.stdout is not None
        for line in proc.stdout:  # booted, reservations verified: the demo proper begins
            if "cma-qemu demo" in line:
                break
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        seen = _watch(
            t0,
            {
                "QEMU gone": lambda: not _alive(agent.qemu_pid),
                "files gone": _gone(files),
                "agent exit": lambda: proc.poll() is not None,
            },
        )
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 143 and stderr == "cma-qemu: terminated by SIGTERM\n"
        assert _new_shm(shm) == set()
        assert seen["QEMU gone"] <= seen["agent exit"] and seen["files gone"] <= seen["agent exit"]
        _report("demo, agent SIGTERM", **{k.replace(" ", "_"): v for k, v in seen.items()})
    finally:
        agent.kill()


def test_sigkill_of_the_agent_then_of_qemu(boot_sleeping: Callable[[], Agent]) -> None:
    """SIGKILL to the agent: QEMU and its RAM go at once, the runtime directory at the next
    start. That next start then loses its QEMU to SIGKILL: it exits 1 and leaves nothing."""
    first = boot_sleeping()
    t0 = time.monotonic()
    first.proc.send_signal(signal.SIGKILL)
    qemu = _until("QEMU's exit", lambda: not _alive(first.qemu_pid), t0)
    first.proc.wait(10)
    assert _new_shm(first.shm_before) == set()  # RAM: held by the two dead processes only
    assert not Path(first.ram_path).exists()
    left = first.runtime_dir
    assert rundir.owner_alive(left) is False or not left.exists()  # another run may sweep it
    _report("boot, agent SIGKILL", QEMU_and_RAM_gone=qemu)

    second = boot_sleeping()
    assert not left.exists(), "the next start did not sweep the dead agent's directory"
    files = second.files()
    t0 = time.monotonic()
    os.kill(second.qemu_pid, signal.SIGKILL)
    seen = _watch(
        t0, {"agent exit": lambda: second.proc.poll() is not None, "files gone": _gone(files)}
    )
    _, stderr = second.proc.communicate(timeout=10)
    assert second.proc.returncode == 1, stderr
    assert "cma-qemu: EIO: console: " in stderr  # the console of the guest command went away
    assert _gone(files)() and _new_shm(second.shm_before) == set()
    assert seen["files gone"] <= seen["agent exit"]
    _report("boot, QEMU SIGKILL", **{k.replace(" ", "_"): v for k, v in seen.items()})


def test_interactive_console_stops_cleanly_on_sighup() -> None:
    """The console path (pexpect's interact in a thread, the terminal raw): a hang-up."""
    shm = _shm()
    child = pexpect.spawn(CLI, ["boot", "virt"], env=ENV, encoding="utf-8", timeout=BOOT_TIMEOUT)
    try:
        child.expect("guest console")
        child.expect("cma# ")
        assert child.pid is not None
        found = _find_qemu(child.pid)
        assert found is not None
        qemu_pid, argv = found
        runtime = Path(_option(argv, r"-qmp unix:([^,]+)")).parent
        agent_pid = child.pid
        t0 = time.monotonic()
        child.kill(signal.SIGHUP)
        seen = _watch(
            t0,
            {
                "QEMU gone": lambda: not _alive(qemu_pid),
                "files gone": lambda: not runtime.exists(),
                "agent exit": lambda: not _alive(agent_pid),
            },
        )
        child.expect(pexpect.EOF, timeout=GONE_TIMEOUT)
        child.wait()
        assert child.exitstatus == 128 + signal.SIGHUP, child.before
        assert "cma-qemu: terminated by SIGHUP" in str(child.before)
        assert not runtime.exists() and _new_shm(shm) == set()
        _report("boot console, agent SIGHUP", **{k.replace(" ", "_"): v for k, v in seen.items()})
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)
        child.close(force=True)


# -------------------------------------------------------------------------- attach
def test_sigterm_detaches_and_leaves_qemu_running(tmp_path: Path) -> None:
    board = load_board("virt")
    reservations = [(r.name, r.start, r.size) for r in build_cma(board=board).regions]
    files = LaunchFiles.in_dir(tmp_path, tmp_path / "guest.ram")
    files.dtb.write_bytes(
        add_reserved_memory(dump_qemu_dtb(machine_args(board, files.ram_file)), reservations)
    )
    argv = qemu_command(board, guest_image(board.kernel_flavour), files)
    qemu = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace")
    attach: subprocess.Popen[str] | None = None
    try:
        qemu.expect(r"cma-qemu: ready channel=", timeout=BOOT_TIMEOUT)
        cmd = [CLI, "attach", "--board", "virt", "--json"]
        cmd += ["--qmp", str(files.qmp_socket), "--channel", str(files.channel_socket)]
        attach = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        info = read_first_json(attach, 60)
        monitor = Path(str(info["monitor"]))
        assert monitor.exists()
        before = sorted(tmp_path.iterdir())
        (scratch,) = [  # its own pmemsave scratch directory, which names it as the owner
            p for p in TMP.glob("cma-qemu-attach-*") if _owner_pid(p) == attach.pid
        ]

        t0 = time.monotonic()
        attach.send_signal(signal.SIGTERM)
        proc = attach
        exited = _until("the agent exit", lambda: proc.poll() is not None, t0)
        _, stderr = attach.communicate(timeout=10)
        assert attach.returncode == 143 and stderr == "cma-qemu: terminated by SIGTERM\n"
        assert qemu.isalive()  # an attached QEMU keeps running ...
        assert sorted(tmp_path.iterdir()) == sorted(set(before) - {monitor})  # ... files intact
        assert not monitor.exists()  # the agent's own socket is gone
        assert not scratch.exists()
        qemu.sendline("")
        qemu.expect("cma# ")  # the guest still answers
        _report("attach, agent SIGTERM", agent_exit=exited)
    finally:
        if attach is not None and attach.poll() is None:
            attach.kill()
            attach.wait()
        qemu.close(force=True)


# -------------------------------------------------------------------------- pytest plugin
def test_pytest_session_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """A CI job's SIGTERM to pytest while a plugin board runs a test: exit 143, nothing left."""
    (tmp_path / "test_sleepy.py").write_text(
        textwrap.dedent(
            """
            def test_sleeps(guest):
                print("\\nguest-up", flush=True)
                guest.run("sleep 60")
            """
        )
    )
    shm = _shm()
    proc = subprocess.Popen(
        [str(BIN / "pytest"), "-s", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    agent = Agent(proc, shm)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "guest-up" in line:
                break
        agent.wait_for_qemu(10)
        agent.check_running()
        files = agent.files()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        seen = _watch(
            t0,
            {
                "QEMU gone": lambda: not _alive(agent.qemu_pid),
                "files gone": _gone(files),
                "pytest exit": lambda: proc.poll() is not None,
            },
        )
        out = proc.stdout.read()
        assert proc.returncode == 143, out
        assert "lifecycle.Terminated: 15" in out, out  # pytest's "interrupted" summary
        assert _gone(files)() and _new_shm(shm) == set()
        # (pytest's own exit takes longer: its terminal summary imports hypothesis's reporter)
        _report("pytest plugin, SIGTERM", **{k.replace(" ", "_"): v for k, v in seen.items()})
    finally:
        agent.kill()
