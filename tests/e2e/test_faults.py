"""The fault matrix: real faults against a real booted virt guest, and what the agent does.

Each test injects one fault, checks that the agent noticed, that no chunk and no file is left
behind, and that the next request is answered; it records a row (what happened, chunks
leaked, files left, seconds to notice) that RELIABILITY.md's "Fault matrix" table copies.
Set ``CMA_FAULT_FIGURES=/path/file.jsonl`` to collect the rows, or run with ``-s`` to see them.

All but the QEMU kill share the session's board (the plugin's ``cma_board``); the two that
reboot the guest (reset, panic) wait until it is up again, so the tests stay independent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from cma_qemu.channel import GuestSession
from cma_qemu.monitor.server import MAX_UNENDED
from cma_qemu.pytest_plugin import Guest, SyncAgent

pytestmark = pytest.mark.e2e

CLI = str(Path(sys.executable).with_name("cma-qemu"))
MiB = 1 << 20
#: A guest stub that allocates and then holds its chunks (its input stays open) until killed.
HOLDING_STUB = (
    "(printf 'alloc camera 2M\\nalloc vpu/dec 1M\\n'; sleep 600) | cma-test > /dev/null 2>&1 &"
)
NEXT_SESSION = "alloc camera 1M\nlist\n"
NEXT_SESSION_OUT = "1: 0x100000@{addr:#x}\n1: 0x100000@{addr:#x}\n"


# ------------------------------------------------------------------------------- recording
def record(scenario: str, did: str, chunks_leaked: int, files_left: int, notice_s: float | None,
           **figures: object) -> None:  # fmt: skip
    """One row of the fault matrix: printed, and appended to $CMA_FAULT_FIGURES if set."""
    row = {
        "scenario": scenario,
        "agent": did,
        "chunks_leaked": chunks_leaked,
        "files_left": files_left,
        "notice_s": None if notice_s is None else round(notice_s, 3),
        **figures,
    }
    print(f"\nFAULT {json.dumps(row)}")
    target = os.environ.get("CMA_FAULT_FIGURES")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------ process figures
def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what they are (the shared agent runs here)."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def fds_back(baseline: dict[int, str]) -> bool:
    """No more fds open than at ``baseline``. (Fewer is fine: a connection the previous test
    closed may still have been closing then. A count, as a reconnected socket is a new one.)"""
    return len(open_fds()) <= len(baseline)


def new_fds(baseline: dict[int, str]) -> str:
    """The fds opened since ``baseline``, for an assertion message."""
    return str(sorted(set(open_fds().items()) - set(baseline.items())))


def status_kib(key: str, pid: int | str = "self") -> int:
    """A ``/proc/PID/status`` figure in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs resets the peak RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def wait_until(
    predicate: Callable[[], object],
    what: str,
    timeout: float = 60.0,
    detail: Callable[[], str] = str,
) -> float:
    """Poll ``predicate`` every 10 ms; the seconds it took to hold."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} {detail()}")
        time.sleep(0.01)
    return time.monotonic() - start


async def await_until(
    predicate: Callable[[], object],
    what: str,
    timeout: float = 60.0,
    detail: Callable[[], str] = str,
) -> float:
    """:func:`wait_until` for async tests (the test's loop keeps running meanwhile)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} {detail()}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def connected_to(path: str | os.PathLike[str]) -> dict[int, int]:
    """{fd: socket inode} of this process's Unix sockets connected to ``path``."""
    found: dict[int, int] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if not target.startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(name))) as sock:
                if sock.family == socket.AF_UNIX and sock.getpeername() == os.fspath(path):
                    found[int(name)] = int(target[len("socket:[") : -1])
    return found


def answered_over(session: GuestSession, count: int) -> Callable[[], bool]:
    """True once the guest session has answered more than ``count`` requests in all."""
    return lambda: session.requests > count


def held_chunks(agent: SyncAgent) -> list[tuple[int, int, str | None]]:
    """The guest's chunks as (start, size, region)."""
    return [(c.start, c.size, c.region.name) for c in agent.guest_chunks()]


def next_session_works(agent: SyncAgent, guest: Guest) -> None:
    """A new stub session after the fault: allocates, lists, and frees on exit."""
    result = guest.run_script(NEXT_SESSION)
    assert result.stderr == "" and result.status == 0, result
    addr = agent.cma.region("camera").start  # camera is empty again: best fit starts there
    assert result.stdout == NEXT_SESSION_OUT.format(addr=addr)
    assert agent.guest_chunks() == []


@contextlib.asynccontextmanager
async def monitor_client(agent: SyncAgent, name: str = "faults") -> AsyncIterator[QMPClient]:
    client = QMPClient(name)
    await client.connect(agent.monitor_path)
    try:
        yield client
    finally:
        await client.disconnect()


async def guest_reset_events(listener: Any, chunks: int, timeout: float = 60.0) -> list[Any]:
    """CMA_GUEST_RESET events until they account for ``chunks`` released chunks."""
    events: list[Any] = []
    while sum(e["data"]["released"] for e in events) < chunks:
        event = await asyncio.wait_for(listener.get(), timeout)
        if event["event"] == "CMA_GUEST_RESET":
            events.append(event)
    return events


# --------------------------------------------------------------------------- QEMU SIGKILL
def _pid_serving(qmp_path: str) -> int:
    """The QEMU whose command line serves QMP at ``qmp_path``."""
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"qemu-system-arm") and any(
                qmp_path.encode() in arg for arg in argv
            ):
                return int(entry.name)
    raise AssertionError(f"no QEMU serves {qmp_path}")


def _mem_path(pid: int) -> Path | None:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    for arg in argv:
        match = re.search(r"mem-path=([^,]+)", arg)
        if match:
            return Path(match.group(1))
    return None


async def test_qemu_sigkill_ends_the_agent_and_leaves_nothing(tmp_path: Path) -> None:
    monitor = tmp_path / "mon" / "monitor.sock"
    proc = subprocess.Popen(
        [CLI, "boot", "virt", "--json", "--monitor", str(monitor), "--run",
         "(echo 'alloc camera 2M'; sleep 600) | cma-test"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        text = ""
        while not text.endswith("\n}\n"):  # --json prints one indented object
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 180)
            assert line, f"the CLI ended before printing its JSON: {text!r}"
            text += line
        info = json.loads(text)
        qemu = _pid_serving(info["qmp"])
        ram = _mem_path(qemu)
        runtime = Path(info["qmp"]).parent
        client = QMPClient("faults-qemu-kill")
        await client.connect(str(monitor))
        try:
            chunks: Any = []
            for _ in range(600):
                chunks = await client.execute("query-cma-chunks")
                if chunks:
                    break
                await asyncio.sleep(0.05)
            assert [(c["region"], c["size"]) for c in chunks] == [("camera", 2 * MiB)]
        finally:
            await client.disconnect()

        os.kill(qemu, signal.SIGKILL)
        killed = time.monotonic()
        status = await asyncio.wait_for(asyncio.to_thread(proc.wait), 60)
        notice = time.monotonic() - killed
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = [p for p in (runtime, monitor, ram) if p is not None and p.exists()]
    assert status == 1, stderr
    error = next((x for x in stderr.splitlines() if x.startswith("cma-qemu: ")), "")
    assert error.startswith("cma-qemu: EIO: ") and "QEMU closed the console" in error, stderr
    assert left == []
    assert not Path(f"/proc/{qemu}").exists()  # reaped, not a zombie
    record(
        "QEMU SIGKILL (boot, guest holding a chunk)",
        "CLI exits with status 1: 'cma-qemu: EIO: ... QEMU closed the console (it exited)'; "
        "runtime dir, RAM file and monitor socket removed",
        chunks_leaked=0,  # the agent process is gone with its framework
        files_left=len(left),
        notice_s=notice,
    )


# ----------------------------------------------------------------------- guest reboots
async def test_guest_reset_releases_what_the_guest_held(agent: SyncAgent, guest: Guest) -> None:
    async with monitor_client(agent) as client:
        with client.listener(("CMA_GUEST_RESET",)) as listener:
            await asyncio.to_thread(guest.check, HOLDING_STUB)
            await await_until(lambda: len(agent.guest_chunks()) == 2, "the stub's 2 chunks")
            held = held_chunks(agent)
            console = agent.agent.console
            mark = console.mark()
            start = time.monotonic()
            await asyncio.to_thread(agent.qmp, "system_reset")
            events = await guest_reset_events(listener, len(held))
            notice = time.monotonic() - start
            await asyncio.to_thread(agent.call, agent.agent.machine.wait_ready(120, since=mark))
    assert agent.guest_chunks() == []
    released = sorted(a for e in events for a in e["data"]["chunks"])
    assert released == sorted(start for start, _, _ in held)
    reasons = [e["data"]["reason"] for e in events]
    assert set(reasons) <= {"reset", "port-closed"}, reasons
    await asyncio.to_thread(next_session_works, agent, guest)
    record(
        "guest reset (QMP system_reset)",
        f"chunks released on {'/'.join(reasons)}; CMA_GUEST_RESET; guest back, next stub served",
        chunks_leaked=len(agent.guest_chunks()),
        files_left=0,
        notice_s=notice,
    )


async def test_guest_kernel_panic_reboots_and_releases(agent: SyncAgent, guest: Guest) -> None:
    # panic=1 on the kernel command line: the guest reboots a second after the panic, QEMU
    # says RESET (and closes the port first), and the agent releases what the guest held.
    async with monitor_client(agent) as client:
        with client.listener(("CMA_GUEST_RESET",)) as listener:
            await asyncio.to_thread(guest.check, HOLDING_STUB)
            await await_until(lambda: len(agent.guest_chunks()) == 2, "the stub's 2 chunks")
            held = held_chunks(agent)
            console = agent.agent.console
            mark = console.mark()
            start = time.monotonic()
            await asyncio.to_thread(
                agent.call, console.converse("echo c > /proc/sysrq-trigger", None)
            )
            events = await guest_reset_events(listener, len(held))
            notice = time.monotonic() - start
            await asyncio.to_thread(agent.call, agent.agent.machine.wait_ready(120, since=mark))
    assert "Kernel panic - not syncing: sysrq triggered crash" in console.log
    assert agent.guest_chunks() == []
    released = sorted(a for e in events for a in e["data"]["chunks"])
    assert released == sorted(start for start, _, _ in held)
    reasons = [e["data"]["reason"] for e in events]
    await asyncio.to_thread(next_session_works, agent, guest)
    record(
        "guest kernel panic (echo c > /proc/sysrq-trigger)",
        f"guest reboots (panic=1); chunks released on {'/'.join(reasons)}; next stub served",
        chunks_leaked=len(agent.guest_chunks()),
        files_left=0,
        notice_s=notice,
    )


# ------------------------------------------------------------------------------ the stub
def test_stub_killed_mid_request_leaves_no_chunk(agent: SyncAgent, guest: Guest) -> None:
    # The stub allocates 1M and then runs alloc+free round trips; SIGKILL lands while a
    # request is in flight. Closing its port must give back everything, whichever request
    # the agent answered last. Five kills at different moments.
    session = agent.agent.channel.session(agent.agent.port)
    notices, requests = [], []
    fds = open_fds()
    guest.check("printf 'alloc camera 1M\\nbench 1000000 camera 64K\\n' > /tmp/bench.txt")
    for attempt in range(5):
        before = session.requests
        guest.check("cma-test < /tmp/bench.txt > /dev/null 2>&1 &")
        wait_until(answered_over(session, before + 50 + 40 * attempt), "round trips")
        start = time.monotonic()
        guest.check("kill -9 $(pidof cma-test)")
        wait_until(lambda: agent.guest_chunks() == [], "the release")
        notices.append(time.monotonic() - start)
        requests.append(session.requests - before)
        time.sleep(0.3)  # a request the agent read after the port closed would show up now
        assert agent.guest_chunks() == [], f"attempt {attempt}: {held_chunks(agent)}"
    assert agent.cma.region("camera").free_space == agent.cma.region("camera").size
    next_session_works(agent, guest)
    assert fds_back(fds), new_fds(fds)
    record(
        "the stub SIGKILLed mid-request (5 times)",
        "port closed (VSERPORT_CHANGE) releases the stub's chunks; next stub served",
        chunks_leaked=0,
        files_left=0,
        notice_s=max(notices),
        requests_before_kill=requests,
    )


# --------------------------------------------------------------------------- the channel
def test_channel_socket_dropped_and_reconnected(agent: SyncAgent, guest: Guest) -> None:
    path = agent.agent.machine.channel_path
    fds = open_fds()
    with guest.stub() as stub:
        assert re.fullmatch(r"1: 0x200000@0x[0-9a-f]+\n?", stub.send("alloc camera 2M"))
        held = held_chunks(agent)
        old = connected_to(path)
        assert len(old) == 1, old
        (fd,) = old
        with socket.socket(fileno=os.dup(fd)) as sock:  # the agent's own connection
            sock.shutdown(socket.SHUT_RDWR)
        start = time.monotonic()
        reconnect = wait_until(
            lambda: (now := connected_to(path)) and set(now.values()).isdisjoint(old.values()),
            "a new channel connection",
            timeout=30,
        )
        assert held_chunks(agent) == held  # the guest's chunks stay
        assert re.fullmatch(r"2: 0x100000@0x[0-9a-f]+\n?", stub.send("alloc camera 1M"))
        answered = time.monotonic() - start
        assert stub.send("free 1").strip() == ""  # an old chunk is freed after the reconnect
        assert len(agent.guest_chunks()) == 1
    assert agent.guest_chunks() == []
    assert fds_back(fds), new_fds(fds)
    record(
        "channel socket dropped by the agent's side (shutdown), reconnected",
        "reconnects; the guest keeps its chunks; next request answered; old chunk freed",
        chunks_leaked=0,
        files_left=0,
        notice_s=reconnect,
        next_reply_s=round(answered, 3),
    )


def test_guest_sends_10_mib_of_random_bytes(agent: SyncAgent, guest: Guest) -> None:
    # The guest writes 10 MiB of /dev/urandom into its channel while reading the replies,
    # then a ping. Every garbage line gets exactly one error reply, memory stays flat, and
    # the next session is served.
    session = agent.agent.channel.session(agent.agent.port)
    before = session.requests
    fds = open_fds()
    reset_peak_rss()
    rss = status_kib("VmRSS")
    script = (
        'exec 3<>"$CMA_CHANNEL"; cat <&3 > /tmp/replies & '
        "head -c 10485760 /dev/urandom >&3; "
        'printf \'\\n{"execute":"guest-ping","id":"done"}\\n\' >&3; '
        'n=0; while ! grep -q \'"id":"done"\' /tmp/replies && [ $n -lt 300 ]; do '
        "sleep 0.1; n=$((n+1)); done; kill $!; exec 3>&-; "
        'wc -l < /tmp/replies; grep -c \'^{"error":{"class":"GenericError"\' /tmp/replies; '
        "tail -n 1 /tmp/replies; rm /tmp/replies"
    )
    start = time.monotonic()
    out = guest.check(script, timeout=180)
    seconds = time.monotonic() - start
    peak = status_kib("VmHWM") - rss
    lines, errors, last = out.splitlines()
    answered = session.requests - before
    assert json.loads(last) == {"return": {}, "id": "done"}
    assert int(lines) == answered and int(errors) == answered - 1  # one reply per request
    assert answered > 10_000  # ~1 newline per 256 random bytes
    assert peak < 16 * 1024, f"peak RSS grew by {peak} KiB"  # the 10 MiB never piled up
    assert agent.guest_chunks() == []
    next_session_works(agent, guest)
    assert fds_back(fds), new_fds(fds)
    record(
        "the guest sends 10 MiB of random bytes on its channel",
        f"{answered - 1} garbage lines, one GenericError reply each; the ping answered; "
        "next stub served",
        chunks_leaked=0,
        files_left=0,
        notice_s=None,
        seconds=round(seconds, 2),
        peak_rss_growth_kib=peak,
    )


# --------------------------------------------------------------------------- the monitor
def _raw_monitor(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    reader = sock.makefile("rb")
    assert b"QMP" in reader.readline()
    sock.sendall(b'{"execute":"qmp_capabilities"}\n')
    assert b"return" in reader.readline()
    reader.close()
    return sock


def test_monitor_client_disconnects_mid_command(agent: SyncAgent) -> None:
    # 10 clients each ask for 4 MiB of guest memory (a 5.6 MB reply, more than a socket
    # buffer holds) and close at once, half of them with RST (SO_LINGER 0); 10 more close
    # halfway through a request line.
    fds = open_fds()
    start_addr = agent.cma.region("common").start
    read = json.dumps({"execute": "cma-read", "arguments": {"addr": start_addr, "size": 4 * MiB}})
    for n in range(10):
        sock = _raw_monitor(agent.monitor_path)
        if n % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.sendall(read.encode() + b"\n")
        sock.close()
    for _ in range(10):
        sock = _raw_monitor(agent.monitor_path)
        sock.sendall(b'{"execute":"cma-alloc","arguments":{"dev":"x","si')
        sock.close()
    notice = wait_until(
        lambda: fds_back(fds), "the monitor to drop the clients", 30, lambda: new_fds(fds)
    )
    with contextlib.closing(_raw_monitor(agent.monitor_path)) as sock:
        sock.sendall(b'{"execute":"query-cma-chunks","id":1}\n')
        reply = json.loads(sock.makefile("rb").readline())
    assert reply == {"return": [], "id": 1}  # served, and no half request was run
    assert agent.cma.chunks == []
    record(
        "monitor clients that disconnect mid-command (20)",
        "command finishes, its reply is dropped with the connection; others served",
        chunks_leaked=len(agent.cma.chunks),
        files_left=0,
        notice_s=notice,
    )


async def _one_client(path: str, n: int, rounds: int) -> list[float]:
    client = QMPClient(f"faults-{n}")
    await client.connect(path)
    latencies = []
    try:
        for _ in range(rounds):
            t = time.monotonic()
            chunk: Any = await client.execute("cma-alloc", {"dev": f"c{n}", "size": 64 * 1024})
            await client.execute("query-cma-regions")
            await client.execute("cma-free", {"addr": chunk["addr"]})
            latencies.append(time.monotonic() - t)
    finally:
        await client.disconnect()
    return latencies


async def test_50_monitor_clients_at_once(agent: SyncAgent) -> None:
    fds = open_fds()
    clients, rounds = 50, 10
    start = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(_one_client(agent.monitor_path, n, rounds) for n in range(clients))),
        120,
    )
    total = time.monotonic() - start
    assert [len(r) for r in results] == [rounds] * clients  # every client was answered
    assert agent.cma.chunks == []
    await await_until(
        lambda: fds_back(fds), "the monitor to close the 50 connections", 30, lambda: new_fds(fds)
    )
    per_client = sorted(sum(r) for r in results)
    flat = sorted(x for r in results for x in r)
    record(
        "50 monitor clients at once (10 alloc+query+free rounds each)",
        "all 1500 commands answered; chunks freed; connections closed",
        chunks_leaked=len(agent.cma.chunks),
        files_left=0,
        notice_s=None,
        seconds=round(total, 2),
        round_p50_ms=round(flat[len(flat) // 2] * 1000, 1),
        round_p99_ms=round(flat[int(len(flat) * 0.99)] * 1000, 1),
        slowest_client_s=round(per_client[-1], 2),
        fastest_client_s=round(per_client[0], 2),
    )


def _flood_monitor(path: str, head: bytes, filler: bytes) -> tuple[list[dict[str, Any]], int]:
    """Send ``head`` and then ``filler`` with no newline until the monitor hangs up."""
    sock = _raw_monitor(path)
    block = filler * (65536 // len(filler))
    sent = 0
    with sock:
        try:
            sock.sendall(head)
            sent = len(head)
            while sent < 10 * MiB:
                sock.sendall(block)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                received += data
    return [json.loads(line) for line in received.splitlines()], sent


@pytest.mark.parametrize(
    ("head", "filler"),
    [(b'{"execute":"cma-set-map","arguments":{"map":"', b"a"), (b"", b"\x00")],
    ids=["json-string", "nul-bytes"],
)
async def test_monitor_client_sends_10_mib_without_newline(
    agent: SyncAgent, head: bytes, filler: bytes
) -> None:
    fds = open_fds()
    map_before = agent.cma.map_text
    async with monitor_client(agent, "bystander") as bystander:
        reset_peak_rss()
        rss = status_kib("VmRSS")
        start = time.monotonic()
        replies, sent = await asyncio.to_thread(_flood_monitor, agent.monitor_path, head, filler)
        seconds = time.monotonic() - start
        peak = status_kib("VmHWM") - rss
        assert await bystander.execute("query-cma-map")  # the others are served meanwhile
    assert sent < 10 * MiB, "the monitor read all 10 MiB"
    assert [r["error"]["class"] for r in replies] == ["GenericError"] * 2, replies
    assert replies[-1]["error"]["desc"] == (
        f"no end of request in {MAX_UNENDED} bytes; closing the connection"
    )
    assert peak < 8 * 1024, f"peak RSS grew by {peak} KiB"
    assert agent.cma.map_text == map_before
    await await_until(lambda: fds_back(fds), "the connection to close", 10, lambda: new_fds(fds))
    record(
        f"a monitor client sends 10 MiB with no newline ({'JSON string' if head else 'NUL bytes'})",
        f"'{replies[0]['error']['desc'][:40]}...', then '{replies[-1]['error']['desc']}'; "
        "disconnected; other client served",
        chunks_leaked=0,
        files_left=0,
        notice_s=seconds,
        bytes_read_before_close=sent,
        peak_rss_growth_kib=peak,
    )
