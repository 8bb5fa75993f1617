"""labgrid: the example project in examples/labgrid, run as a labgrid user runs it.

Locally: ``pytest --lg-env env.yaml`` in a subprocess, with ``TMPDIR`` pointed at a directory
of this test's: labgrid's own temporary directory and the driver's (DTB, RAM file, sockets)
both go there, so after the run it must be empty and no QEMU of it may be left.

Through a farm: a real ``labgrid-coordinator`` on 127.0.0.1, an exporter publishing a
``NetworkService`` for a host that runs cma-qemu (this machine, through an sshd the test
starts on a port of its own), and ``labgrid-client`` reserving and acquiring the place before
``pytest --lg-env remote-env.yaml`` runs the same tests through it. One boot each; one more
for a client SIGKILLed with the board on, after which nothing of it may run and its
directories must go at the next sweep.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cma_qemu.machine import rundir

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "labgrid"
PYTEST = [sys.executable, "-m", "pytest"]


def qemus_under(directory: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(directory) in line]


def test_the_labgrid_example_passes_and_leaves_nothing(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project)  # run outside the checkout, as a project of its own
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    result = subprocess.run(
        [*PYTEST, "--lg-env", "env.yaml", "-p", "no:cacheprovider", "-q"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    assert list(scratch.iterdir()) == []
    assert qemus_under(scratch) == []


# -- the distributed path: coordinator, exporter, client, a host reached by ssh ---------------

BIN = Path(sys.executable).parent
SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not listen on {port}")


@dataclass
class Sshd:
    port: int
    key: Path


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """Debian's sshd on a port of its own for 127.0.0.1, with a key made for this test only.

    Its own config, host key and authorized_keys file (``AuthorizedKeysFile`` points into the
    test's directory), so the user's ``~/.ssh`` and any system sshd are not touched.
    """
    assert SSHD.exists(), "sshd missing: ./dev.sh setup installs openssh-server"
    d = tmp_path / "sshd"
    d.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)  # fmt: skip
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = free_port()
    config = [
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host'}",
        f"PidFile {d / 'sshd.pid'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        "AllowStreamLocalForwarding yes", "StreamLocalBindUnlink yes",
    ]  # fmt: skip
    if "CMA_QEMU_CACHE" in os.environ:  # the host finds the same guest images
        config.append(f"SetEnv CMA_QEMU_CACHE={os.environ['CMA_QEMU_CACHE']}")
    (d / "sshd_config").write_text("\n".join(config) + "\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_port(port, proc, "sshd")
        yield Sshd(port, d / "client")
    finally:
        stop(proc)


def lg(env: dict[str, str], *args: str, timeout: float = 60) -> str:
    result = subprocess.run([str(BIN / "labgrid-client"), *args], env=env, capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, f"labgrid-client {args}: {result.stdout}{result.stderr}"
    return result.stdout


@dataclass
class Farm:
    env: dict[str, str]  # LG_COORDINATOR and the LG_TOKEN of the reservation
    project: Path  # the example, its remote-env.yaml pointing at the test's sshd


@pytest.fixture
def farm(tmp_path: Path, sshd: Sshd) -> Iterator[Farm]:
    """coordinator + exporter (a NetworkService for 127.0.0.1) + the place reserved, acquired."""
    run = tmp_path / "farm"
    run.mkdir()
    port = free_port()
    env = {**os.environ, "LG_COORDINATOR": f"127.0.0.1:{port}"}
    coordinator = subprocess.Popen(
        [str(BIN / "labgrid-coordinator"), "-l", f"127.0.0.1:{port}"], cwd=run,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    exporter = None
    try:
        wait_for_port(port, coordinator, "labgrid-coordinator")
        exports = yaml.safe_load((EXAMPLE / "exporter.yaml").read_text())
        exports["cma-host"]["NetworkService"]["port"] = sshd.port
        (run / "exporter.yaml").write_text(yaml.safe_dump(exports, sort_keys=False))
        exporter = subprocess.Popen(
            [str(BIN / "labgrid-exporter"), "-c", f"127.0.0.1:{port}", "-n", "farmhost",
             "--hostname", "127.0.0.1", "exporter.yaml"], cwd=run, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while "farmhost/cma-host/NetworkService" not in lg(env, "resources"):
            assert time.monotonic() < deadline and exporter.poll() is None, "no exported host"
            time.sleep(0.5)

        lg(env, "-p", "cma-qemu", "create")
        lg(env, "-p", "cma-qemu", "add-match", "farmhost/cma-host/NetworkService")
        lg(env, "-p", "cma-qemu", "set-tags", "board=virt")
        reserved = lg(env, "reserve", "--wait", "--shell", "board=virt")
        token = re.search(r"LG_TOKEN=(\S+)", reserved)
        assert token, reserved
        env["LG_TOKEN"] = token.group(1)
        lg(env, "-p", "+", "acquire")
        assert "acquired: " in lg(env, "-p", "cma-qemu", "show")

        project = tmp_path / "project"
        shutil.copytree(EXAMPLE, project)
        remote = yaml.safe_load((project / "remote-env.yaml").read_text())
        driver = remote["targets"]["main"]["drivers"]["CmaQemuDriver"]
        driver["keyfile"] = str(sshd.key)
        driver["remote_cma_qemu"] = str(BIN / "cma-qemu")
        (project / "remote-env.yaml").write_text(yaml.safe_dump(remote, sort_keys=False))
        yield Farm(env, project)
    finally:
        if exporter is not None:
            stop(exporter)
        stop(coordinator)


@pytest.fixture
def host_dirs() -> Iterator[None]:
    """No ``/tmp/cma-qemu-labgrid-*`` of the test and no QEMU of one is left after it."""
    before = set(Path("/tmp").glob("cma-qemu-labgrid-*"))
    yield
    left = set(Path("/tmp").glob("cma-qemu-labgrid-*")) - before
    assert left == set()  # the host's directory went with the board
    assert qemus_under(Path("/tmp/cma-qemu-labgrid-")) == []


def test_a_farm_place_runs_the_example_on_its_host(farm: Farm, host_dirs: None) -> None:
    """``pytest --lg-env remote-env.yaml`` through the acquired place, then ``release``."""
    result = subprocess.run(
        [*PYTEST, "--lg-env", "remote-env.yaml", "-p", "no:cacheprovider", "-q"],
        cwd=farm.project, env=farm.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    lg(farm.env, "-p", "cma-qemu", "release")


#: A labgrid client that powers the board on, says where its host directory is, and waits.
CLIENT = """
import sys, time
from labgrid import Environment
strategy = Environment("remote-env.yaml").get_target("main").get_driver("CmaQemuStrategy")
strategy.transition("shell")
print("host-dir", strategy.power._remote_dir, flush=True)
time.sleep(600)
"""


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a path short enough for Unix sockets in it (tmp_path is too long)."""
    path = Path(tempfile.mkdtemp(prefix="lg-kill-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def processes_naming(text: str) -> list[str]:
    """The command lines (from /proc) of live processes with ``text`` in an argument."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        line = b" ".join(argv).decode(errors="replace")
        if text in line and state != "Z":
            found.append(f"{proc.name}: {line}")
    return found


def test_a_sigkilled_client_leaves_nothing_on_the_host(
    farm: Farm, host_dirs: None, short_tmp: Path
) -> None:
    """SIGKILL (a CI runner's timeout) gives the client no chance to deactivate: its ssh
    processes die with it, QEMU and the host's attach with their ssh sessions, and the host
    directory (the guest's RAM file) is swept by the next cma-qemu start on that host."""
    scratch = short_tmp  # the client's TMPDIR: labgrid's console socket path must be short
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT], cwd=farm.project, env={**farm.env, "TMPDIR": str(scratch)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    host_dir = ""
    try:
        assert client.stdout is not None
        line = client.stdout.readline()  # the board is on, its shell reached
        assert line.startswith("host-dir /tmp/cma-qemu-labgrid-"), line + client.stderr.read()
        host_dir = line.split()[1]
        running = processes_naming(host_dir)
        assert any("qemu-system" in p for p in running), running
        assert any(" attach " in p for p in running), running
        assert any(p.split(": ", 1)[1].startswith("ssh ") for p in running), running
        assert Path(host_dir, "guest.ram").exists()
        qemu = next(p.split(":")[0] for p in running if " ssh " not in p and "qemu-system" in p)
        assert Path(host_dir, "owner").read_text().split()[0] == qemu  # QEMU owns the directory
        attach = next(p.split(":")[0] for p in running if " attach " in p and " ssh " not in p)
        attach_dirs = [  # the host attach's own directory (its pmemsave dumps)
            d for d in Path("/tmp").glob("cma-qemu-attach-*")
            if (d / "owner").exists() and (d / "owner").read_text().split()[0] == attach
        ]  # fmt: skip
        assert len(attach_dirs) == 1, attach_dirs

        killed = time.monotonic()
        client.kill()
        client.wait()
        while (left := processes_naming(host_dir)) and time.monotonic() - killed < 20:
            time.sleep(0.1)
        gone = time.monotonic() - killed
        assert left == [], f"{gone:.1f} s after SIGKILL: {left}"
        print(f"SIGKILL to nothing running of {host_dir}: {gone:.2f} s")
        assert not attach_dirs[0].exists()  # the attach removed it on its SIGTERM
        # What the next `cma-qemu attach` on the host (and any start here) sweeps first.
        removed = rundir.sweep(["/tmp", scratch])
        assert Path(host_dir) in removed
        assert not Path(host_dir).exists()
        assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("cma-qemu-")) == []
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        for stream in (client.stdout, client.stderr):
            if stream is not None:
                stream.close()
        if host_dir:  # what the fix failed to end, ended here so that nothing outlives the test
            for entry in processes_naming(host_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.split(":", 1)[0]), signal.SIGKILL)
            shutil.rmtree(host_dir, ignore_errors=True)
