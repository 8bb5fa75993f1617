"""``boot --put`` and ``load_module``: the spec's errors, and files going through the same
shell commands a guest runs (here a host ``sh``: busybox and coreutils agree on them)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cma_qemu.errors import EINVAL, EIO, ENOENT
from cma_qemu.guest_put import load_module, parse_put, put


class HostShell:
    """Runs the "guest" commands in a local sh; counts them (console round trips)."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def guest_run(self, cmd: str, timeout: float = 60.0) -> tuple[str, int]:
        self.commands.append(cmd)
        res = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=False)
        return (res.stdout + res.stderr).strip(), res.returncode


def test_parse_put(tmp_path: Path) -> None:
    local = tmp_path / "a:b.ko"
    local.write_bytes(b"x")
    assert parse_put(f"{local}:/tmp/m.ko") == (local, "/tmp/m.ko")
    assert parse_put(f"{local}:/tmp/") == (local, "/tmp/a:b.ko")
    for spec, error, words in [
        ("/tmp/x", EINVAL, "LOCAL:GUEST"),
        (f"{local}:", EINVAL, "LOCAL:GUEST"),
        (":/tmp/x", EINVAL, "LOCAL:GUEST"),
        (f"{local}:tmp/x", EINVAL, "absolute"),
        (f"{tmp_path}/missing:/tmp/x", ENOENT, "is not a file"),
        (f"{tmp_path}:/tmp/x", ENOENT, "is not a file"),
    ]:
        with pytest.raises(error, match=words) as info:
            parse_put(spec)
        assert "\n" not in str(info.value) and info.value.where == "put"


@given(spec=st.text(max_size=40))
def test_parse_put_never_crashes(spec: str) -> None:
    try:
        local, guest = parse_put(spec)
    except (EINVAL, ENOENT):
        return
    assert local.is_file() and guest.startswith("/")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=20000), mode=st.sampled_from([0o644, 0o755, 0o600, 0o4711]))
def test_put_round_trip_keeps_bytes_and_mode(tmp_path: Path, data: bytes, mode: int) -> None:
    local = tmp_path / "local.bin"
    local.write_bytes(data)
    os.chmod(local, mode)
    guest = tmp_path / "guest dir" / "sub" / "copy.bin"  # made, and a space quoted
    shell = HostShell()
    asyncio.run(put(shell, local, str(guest)))
    assert guest.read_bytes() == data
    assert guest.stat().st_mode & 0o7777 == mode
    assert not guest.with_name("copy.bin.b64").exists()
    assert all(len(c) < 4000 for c in shell.commands)  # under the tty's canonical line


def test_put_failure_is_eio(tmp_path: Path) -> None:
    local = tmp_path / "f"
    local.write_bytes(b"data")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EIO, match="copying"):
        asyncio.run(put(HostShell(), local, str(blocker / "below")))


def test_load_module_copies_once_and_reports_insmod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ko = tmp_path / f"cma-put-test-{os.getpid()}.ko"  # load_module copies to /tmp/NAME
    ko.write_bytes(b"\x7fELF module")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "insmod").write_text(
        '#!/bin/sh\n[ "$2" = ok=1 ] || { echo "No such device"; exit 1; }\n'
    )
    (bin_dir / "insmod").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    shell = HostShell()
    guest = Path("/tmp") / ko.name
    guest.unlink(missing_ok=True)
    try:
        assert asyncio.run(load_module(shell, ko, "ok=1")) == str(guest)
        assert guest.read_bytes() == ko.read_bytes()
        copies = sum("base64 -d" in c for c in shell.commands)
        with pytest.raises(EIO, match="No such device"):
            asyncio.run(load_module(shell, ko))
        assert sum("base64 -d" in c for c in shell.commands) == copies == 1
    finally:
        guest.unlink(missing_ok=True)
