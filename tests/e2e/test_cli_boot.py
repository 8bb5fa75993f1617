"""`cma-qemu boot` as a user runs it: a subprocess of the console script, real QEMU underneath.

Every run is watched from outside: the QEMU child it launched (found in the process tree while
it runs) gives the exact runtime directory and /dev/shm RAM file it used, and after the CLI
exits those, the QEMU process and any other new ``cma-qemu-*`` file must be gone. Other test
sessions may boot boards at the same time, so a new file some running process still names
(their QEMU's command line) is theirs, not a leftover of ours.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cma_qemu.boards import load_board
from cma_qemu.configuration import build_cma
from cma_qemu.first_json import read_first_json

pytestmark = [
    pytest.mark.e2e,
]

CLI = str(Path(sys.executable).with_name("cma-qemu"))
TMP = Path(tempfile.gettempdir())
SHM = Path("/dev/shm")
ENV = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}  # runtime dirs in TMP

SCRIPT = """\
# allocations through virt's map: vpu/f -> fw, vpu/* -> video, camera and isp -> camera
alloc vpu/f 512K
alloc vpu/dec 16M
a camera 8M
alloc isp 4M/1M
r common 1M
# video and common have 32M each: no room for 64M
alloc vpu/dec 64M
bogus line
alloc vpu
list
free 2
free
f 9

list
"""


# -------------------------------------------------------------------------- process helpers
def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.rstrip(b"\0").decode(errors="replace").split("\0") if raw else []


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (of all its threads)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _snapshot() -> set[Path]:
    return set(TMP.glob("cma-qemu-*")) | set(SHM.glob("cma-qemu-*.ram"))


def _all_cmdlines() -> str:
    return "\n".join(" ".join(_cmdline(int(p.name))) for p in Path("/proc").glob("[0-9]*"))


def _left_behind(before: set[Path]) -> set[Path]:
    """New ``cma-qemu-*`` runtime dirs and RAM files that no running process names."""
    stray: set[Path] = set()
    for _ in range(4):  # another session's dir may exist a moment before its QEMU does
        names = _all_cmdlines()
        stray = {
            p
            for p in _snapshot() - before
            if p.exists() and str(p) not in names and not p.name.startswith("cma-qemu-attach-")
        }
        if not stray:
            return stray
        time.sleep(0.5)
    return stray


@dataclass
class Run:
    """One ``cma-qemu`` run and what its QEMU used."""

    proc: subprocess.Popen[str]
    before: set[Path]
    qemu_pid: int | None = None
    qemu_argv: list[str] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    elapsed: float = 0.0

    @property
    def runtime_dir(self) -> Path:
        qmp = next(a for a in self.qemu_argv if a.startswith("unix:"))
        return Path(qmp.removeprefix("unix:").split(",", 1)[0]).parent

    @property
    def ram_file(self) -> Path:
        opts = next(a for a in self.qemu_argv if "mem-path=" in a)
        return Path(re.search(r"mem-path=([^,]+)", opts).group(1))  # type: ignore[union-attr]

    def find_qemu(self) -> None:
        """Record the booting QEMU (not the short ``dumpdtb`` one) once it is there."""
        if self.qemu_pid is not None:
            return
        for child in _children(self.proc.pid):
            argv = _cmdline(child)
            if argv and "qemu-system-arm" in argv[0] and "-qmp" in argv:
                self.qemu_pid, self.qemu_argv = child, argv

    def check_clean(self) -> None:
        """Nothing of this run is left: QEMU, runtime dir, RAM file, other new files."""
        if self.qemu_pid is not None:
            assert not _alive(self.qemu_pid), "QEMU outlived the CLI"
            assert not self.runtime_dir.exists(), self.runtime_dir
            assert not self.ram_file.exists(), self.ram_file
        assert _left_behind(self.before) == set()


def start(*args: str) -> Run:
    before = _snapshot()
    proc = subprocess.Popen(
        [CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    return Run(proc, before)


def cli(*args: str, timeout: float = 180) -> Run:
    """Run ``cma-qemu ARGS`` to the end, watching for its QEMU meanwhile."""
    t0 = time.monotonic()
    run = start(*args)
    try:
        while run.proc.poll() is None and time.monotonic() - t0 < timeout:
            run.find_qemu()
            time.sleep(0.05)
        run.stdout, run.stderr = run.proc.communicate(
            timeout=max(1.0, timeout - (time.monotonic() - t0))
        )
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    run.elapsed = time.monotonic() - t0
    run.check_clean()
    return run


# -------------------------------------------------------------------------- tests
def test_json_and_run_output() -> None:
    run = cli("boot", "virt", "--json", "--run", "cat /proc/iomem")
    assert run.proc.returncode == 0, run.stderr
    assert run.stderr == ""
    info, end = json.JSONDecoder().raw_decode(run.stdout)
    assert {"regions", "monitor", "qmp", "channel"} <= info.keys()
    assert info["board"] == "virt"
    expected = [(r.name, r.start, r.size) for r in build_cma(board=load_board("virt")).regions]
    assert [(r["name"], r["start"], r["size"]) for r in info["regions"]] == expected
    # the sockets lived in the runtime dir the QEMU used, which is gone now
    assert Path(info["qmp"]) == run.runtime_dir / "qmp.sock"
    assert Path(info["channel"]).parent == Path(info["monitor"]).parent == run.runtime_dir

    iomem = run.stdout[end:].strip("\n")
    ram = re.findall(r"^([0-9a-f]+)-([0-9a-f]+) : System RAM$", iomem, re.MULTILINE)
    assert ram, iomem
    for lo, hi in ((int(a, 16), int(b, 16) + 1) for a, b in ram):
        assert 0x40000000 <= lo < hi <= 0x60000000
        for name, s, n in expected:
            assert hi <= s or s + n <= lo, f"{name} overlaps System RAM {lo:#x}-{hi - 1:#x}"


def test_run_exit_status_is_the_guest_command_status() -> None:
    run = cli("boot", "virt", "--run", "echo to-stdout; exit 7")
    assert (run.proc.returncode, run.stdout, run.stderr) == (7, "to-stdout\n", "")


def test_script_prints_what_replay_prints(tmp_path: Path) -> None:
    script = tmp_path / "session.cma"
    script.write_text(SCRIPT)
    replay = subprocess.run(
        [CLI, "replay", str(script), "--board", "virt"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert "ENOMEM" in replay.stderr and "bogus: EINVAL" in replay.stderr
    assert replay.stdout.count("\n") == 13  # 5 allocs, list of 5, list of 3
    run = cli("boot", "virt", "--script", str(script))
    assert run.stdout == replay.stdout
    assert run.stderr == replay.stderr
    assert run.proc.returncode == replay.returncode == 1


@pytest.mark.parametrize(
    ("args", "errno", "parts"),
    [
        (
            ["virt", "--cma", "x=16M@0x40000000"],
            "EADDRINUSE",
            ["'x' 0x40000000-0x40ffffff", "the kernel 0x40000000-"],
        ),
        (
            ["aquila", "--cma", "mfc_b2=16M@0x40000000"],  # the 2010 patch's own address
            "EADDRINUSE",
            ["'mfc_b2' 0x40000000-0x40ffffff", "the kernel 0x40000000-"],
        ),
        (["nosuchboard"], "ENOENT", ["nosuchboard"]),
    ],
)
def test_user_errors_are_one_line(args: list[str], errno: str, parts: list[str]) -> None:
    run = cli("boot", *args, timeout=60)
    assert run.proc.returncode == 1
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and run.stderr.endswith("\n"), run.stderr
    assert lines[0].startswith(f"cma-qemu: {errno}: ")
    for part in parts:
        assert part in lines[0]
    assert run.qemu_pid is None  # refused before any QEMU was started


def test_sigint_during_run_cleans_up() -> None:
    run = start("boot", "virt", "--json", "--run", "sleep 60")
    try:
        info = read_first_json(run.proc, 120)
        run.find_qemu()
        assert run.qemu_pid is not None and Path(str(info["qmp"])).exists()
        assert run.ram_file.exists()
        time.sleep(1)  # the guest is in its `sleep 60` now
        run.proc.send_signal(signal.SIGINT)
        # The guest's `sleep 60` must not be waited for; the bound only keeps a hang from
        # hanging the suite (a stopwatch is not the check: the status and cleanup are).
        run.stdout, run.stderr = run.proc.communicate(timeout=55)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    assert (run.proc.returncode, run.stderr) == (130, "cma-qemu: interrupted\n")
    run.check_clean()
