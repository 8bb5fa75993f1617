"""Snapshot and restore of a booted virt board with its CMA state (issue 9).

One boot per module: the board is booted, a guest program is left holding a chunk it wrote a
pattern into, the snapshot is saved and the booted agent closed. Every test restores from it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cma_qemu.agent import Agent
from cma_qemu.boards import load_board
from cma_qemu.errors import EINVAL, EIO, ENOENT
from cma_qemu.snapshot import SNAPSHOT_FILE, read_snapshot, restore_agent

pytestmark = pytest.mark.e2e

PATTERN = 0xC0DE0000
#: A guest program holds one chunk in the background; its input stays open on the shell's fd 3.
HOLD = (
    "mkfifo /tmp/f; (cma-test < /tmp/f > /tmp/o 2>&1 &); exec 3>/tmp/f; "
    f"echo 'alloc vpu/dec 1M' >&3; echo 'write 1 {PATTERN:#x}' >&3; "
    "for i in 1 2 3 4 5 6 7 8 9 10; do grep -q 1: /tmp/o && break; sleep 0.2; done; cat /tmp/o"
)


def _ours() -> tuple[set[str], set[int]]:
    """This process's memfd RAM files and QEMU children (what a restore must not leave)."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with_target = Path("/proc/self/fd", fd)
        try:
            if "memfd:cma-qemu" in os.readlink(with_target):
                fds.add(fd)
        except OSError:
            continue
    children = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path("/proc", pid, "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and "qemu" in stat.split(")")[0]:
                children.add(int(pid))
    return fds, children


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("snapshot") / "virt"

    async def save() -> None:
        async with await Agent.boot(load_board("virt")) as agent:
            out, status = await agent.console.run(HOLD)
            assert status == 0 and out.startswith("1: 0x100000@"), out
            assert len(agent.chunks_of_guest()) == 1
            await agent.snapshot(path)

    asyncio.run(save())
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_restores_are_independent(snapshot: Path) -> None:
    """A file written in one restore is absent in the next; two at once have their own."""
    for n in range(2):
        async with await Agent.restore(snapshot) as agent:
            assert (await agent.guest_run("ls /tmp/mine"))[1] != 0, f"restore {n} saw a file"
            await agent._check("echo x > /tmp/mine")
    a, b = await asyncio.gather(Agent.restore(snapshot), Agent.restore(snapshot))
    try:
        assert a.machine.runtime_dir != b.machine.runtime_dir
        await a._check("echo a > /tmp/mine")
        assert (await b.guest_run("cat /tmp/mine"))[1] != 0
        assert await a._check("cat /tmp/mine") == "a"
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_held_chunk_intact_and_freed_after_restore(snapshot: Path) -> None:
    info = read_snapshot(snapshot)
    async with await Agent.restore(snapshot) as agent:
        chunks = agent.chunks_of_guest()
        assert [(c.start, c.size, c.refcount) for c in chunks] == [
            (start, size, refcount) for start, size, _, refcount, _ in info.chunks
        ]
        assert await agent.find_mismatch(chunks[0], PATTERN) is None
        start = f"@{chunks[0].start:#x}"
        out = await agent._check(
            f"echo 'verify 1 {PATTERN:#x}' >&3; echo 'free 1' >&3; echo list >&3;"
            " echo 'alloc vpu/dec 1M' >&3;"
            f" for i in $(seq 20); do [ $(grep -c {start} /tmp/o) = 2 ] && break; sleep 0.2; done;"
            " cat /tmp/o"
        )
        assert "EINVAL" not in out and "mismatch" not in out, out
        # freed, then a new allocation lands where it was: nothing stale in the allocator
        assert out.count(start) == 2, out
        assert [(c.start, c.refcount) for c in agent.chunks_of_guest()] == [(chunks[0].start, 1)]


async def test_clock_is_set_from_the_rtc(snapshot: Path) -> None:
    age = time.time() - read_snapshot(snapshot).created
    if age < 5:
        await asyncio.sleep(5 - age)  # so a guest clock left as saved would lag visibly
    async with await Agent.restore(snapshot) as agent:
        guest_now = int(await agent._check("date +%s"))
        assert abs(guest_now - time.time()) < 2.5


async def test_nothing_left_after_restores(snapshot: Path, tmp_path: Path) -> None:
    before = _ours()
    agent = await restore_agent(snapshot, runtime_parent=tmp_path)
    during = _ours()
    assert during[0] > before[0] and len(during[1]) == len(before[1]) + 1
    await agent.close()
    assert _ours() == before
    assert list(tmp_path.iterdir()) == []


def _copy(snapshot: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(snapshot, copy)
    return copy


async def test_bad_snapshots_give_one_error_and_no_qemu(snapshot: Path, tmp_path: Path) -> None:
    before = _ours()
    with pytest.raises(ENOENT, match="no such snapshot"):
        await Agent.restore(tmp_path / "missing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")
    with pytest.raises(EINVAL, match="not a cma-qemu snapshot"):
        await Agent.restore(tmp_path / "foreign")

    truncated = _copy(snapshot, tmp_path / "t")
    state = truncated / "state.mig"
    os.truncate(state, state.stat().st_size // 2)
    with pytest.raises(EIO, match=r"state.mig is .* bytes"):
        await Agent.restore(truncated)

    corrupt = _copy(snapshot, tmp_path / "c")
    data = bytearray((corrupt / "state.mig").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "state.mig").write_bytes(bytes(data))
    with pytest.raises(EIO, match="corrupt"):
        await Agent.restore(corrupt)

    stale = _copy(snapshot, tmp_path / "s")
    doc = json.loads((stale / SNAPSHOT_FILE).read_text())
    doc["key"]["kernel"] = "0" * 64
    doc["key"]["qemu"] = "QEMU emulator version 0.1"
    (stale / SNAPSHOT_FILE).write_text(json.dumps(doc))
    with pytest.raises(EINVAL, match="stale snapshot: QEMU changed; the guest kernel changed"):
        await Agent.restore(stale)

    other = _copy(snapshot, tmp_path / "o")
    doc = json.loads((other / SNAPSHOT_FILE).read_text())
    doc["key"]["regions"] = "other=8M"
    (other / SNAPSHOT_FILE).write_text(json.dumps(doc))
    with pytest.raises(
        EINVAL, match=r"stale snapshot: the placed regions \(the board file\?\) changed"
    ):
        await Agent.restore(other)
    assert _ours() == before


CLI = str(Path(sys.executable).with_name("cma-qemu"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


def test_cli_boot_from_restores_and_refuses_clearly(snapshot: Path, tmp_path: Path) -> None:
    done = _cli("boot", "--from", str(snapshot), "--run", "cat /tmp/o; exit 3")
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("1: 0x100000@"), done.stdout
    before = _ours()
    for args, message in [
        (("--cma", "x=8M"), "EINVAL: snapshot .*: does not match: regions 'x=8M' asked"),
        (("goni",), "EINVAL: snapshot .*: does not match: board 'goni' asked, 'virt' saved"),
    ]:
        done = _cli("boot", "--from", str(snapshot), *args, "--run", "true")
        assert done.returncode == 1 and re.fullmatch(f"cma-qemu: {message}.*\n", done.stderr)
    done = _cli("boot", "--from", str(tmp_path / "nope"), "--run", "true")
    assert done.returncode == 1
    assert (
        done.stderr == f"cma-qemu: ENOENT: snapshot {tmp_path}/nope: no such snapshot directory\n"
    )
    assert _ours() == before


def test_cli_list_and_rm(snapshot: Path, tmp_path: Path) -> None:
    shutil.copytree(snapshot, tmp_path / "one")
    (tmp_path / "junk").mkdir()
    listed = _cli("snapshot", "list", "--dir", str(tmp_path))
    assert listed.returncode == 0
    assert re.search(r"^one  virt  ", listed.stdout, re.MULTILINE), listed.stdout
    assert "unusable" in listed.stdout and "junk" in listed.stdout
    refused = _cli("snapshot", "rm", str(tmp_path / "junk"))
    assert refused.returncode == 1 and "not removed" in refused.stderr
    assert (tmp_path / "junk").is_dir()
    assert _cli("snapshot", "rm", str(tmp_path / "one")).returncode == 0
    assert not (tmp_path / "one").exists()


def _processes_naming(path: Path) -> bool:
    """Whether any process has ``path`` in its command line (QEMU names its runtime dir)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if str(path) in Path("/proc", pid, "cmdline").read_text(errors="replace"):
                    return True
            except OSError:  # gone meanwhile
                continue
    return False


def test_sigterm_under_boot_from_leaves_nothing(snapshot: Path, tmp_path: Path) -> None:
    """A restored board takes the Ctrl-C path like a booted one: QEMU and files gone, 143."""
    monitor = tmp_path / "monitor.sock"
    proc = subprocess.Popen(
        [CLI, "boot", "--from", str(snapshot), "--json", "--monitor", str(monitor),
         "--run", "sleep 60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the JSON starts once the guest is served
        assert first.startswith("{"), first + proc.stderr.read() if proc.stderr else ""
        info_lines = [first]
        while not info_lines[-1].startswith("}"):
            info_lines.append(proc.stdout.readline())
        info = json.loads("".join(info_lines))
        runtime = Path(info["qmp"]).parent
        assert runtime.is_dir() and monitor.exists()
        time.sleep(0.5)
        proc.send_signal(15)
        assert proc.wait(timeout=60) == 143
        assert not runtime.exists() and not monitor.exists()
        gone = time.monotonic() + 10
        while time.monotonic() < gone and _processes_naming(runtime):
            time.sleep(0.1)
        assert time.monotonic() < gone, "QEMU outlived its agent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
