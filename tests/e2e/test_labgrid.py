"""labgrid: the example project in examples/labgrid, run as a labgrid user runs it.

Locally: ``pytest --lg-env env.yaml`` in a subprocess, with ``TMPDIR`` pointed at a directory
of this test's: labgrid's own temporary directory and the driver's (DTB, RAM file, sockets)
both go there, so after the run it must be empty and no QEMU of it may be left.

Through a farm: a real ``labgrid-coordinator`` on 127.0.0.1, an exporter publishing a
``NetworkService`` for a host that runs cma-qemu (this machine, through an sshd the test
starts on a port of its own), and ``labgrid-client`` reserving and acquiring the place before
``pytest --lg-env remote-env.yaml`` runs the same tests through it. One boot each.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

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


def test_a_farm_place_runs_the_example_on_its_host(tmp_path: Path, sshd: Sshd) -> None:
    """coordinator + exporter (a NetworkService for 127.0.0.1) + client reserve/acquire."""
    run = tmp_path / "farm"
    run.mkdir()
    port = free_port()
    env = {**os.environ, "LG_COORDINATOR": f"127.0.0.1:{port}"}
    before = set(Path("/tmp").glob("cma-qemu-labgrid-*"))
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
        result = subprocess.run(
            [*PYTEST, "--lg-env", "remote-env.yaml", "-p", "no:cacheprovider", "-q"],
            cwd=project, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "3 passed" in result.stdout
        lg(env, "-p", "cma-qemu", "release")
    finally:
        if exporter is not None:
            stop(exporter)
        stop(coordinator)
    left = set(Path("/tmp").glob("cma-qemu-labgrid-*")) - before
    assert left == set()  # the host's directory went with the board
    assert qemus_under(Path("/tmp/cma-qemu-labgrid-")) == []
