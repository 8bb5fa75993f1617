"""Runtime directories name their owner; the sweep removes what dead owners left, only that."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cma_qemu.machine import rundir


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _age(path: Path, seconds: float = 2 * rundir.LEGACY_GRACE) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


@pytest.fixture
def shm(tmp_path: Path) -> Path:
    path = tmp_path / "shm"
    path.mkdir()
    return path


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


def test_create_names_this_process(parent: Path) -> None:
    path = rundir.create(parent)
    assert path.parent == parent and path.name.startswith(rundir.PREFIX)
    assert path.stat().st_mode & 0o777 == 0o700
    assert rundir.owner_alive(path) is True
    assert rundir.sweep([parent], shm=parent / "none") == []
    assert path.is_dir()


def test_sweep_removes_a_dead_owners_directory(parent: Path, shm: Path) -> None:
    dead = rundir.create(parent)
    (dead / "qmp.sock").write_text("")
    (dead / rundir.OWNER_FILE).write_text(f"{_dead_pid()} 1\n")
    assert rundir.owner_alive(dead) is False
    alive = rundir.create(parent)
    assert rundir.sweep([parent], shm=shm) == [dead]
    assert not dead.exists() and alive.is_dir()


def test_a_reused_pid_is_not_the_owner(parent: Path, shm: Path) -> None:
    reused = rundir.create(parent)
    start = (reused / rundir.OWNER_FILE).read_text().split()[1]
    (reused / rundir.OWNER_FILE).write_text(f"{os.getpid()} {int(start) - 1}\n")
    assert rundir.owner_alive(reused) is False
    assert rundir.sweep([parent], shm=shm) == [reused]


@pytest.fixture
def bound(parent: Path) -> Iterator[Path]:
    legacy = parent / f"{rundir.PREFIX}legacy-live"
    legacy.mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(legacy / "qmp.sock"))
    server.listen()
    _age(legacy)
    try:
        yield legacy
    finally:
        server.close()


def test_legacy_directories_go_when_no_socket_in_them_is_bound(
    parent: Path, shm: Path, bound: Path
) -> None:
    stale = parent / f"{rundir.PREFIX}legacy-dead"
    stale.mkdir()
    (stale / "channel.sock").write_text("")  # a socket file nobody has bound any more
    _age(stale)
    young = parent / f"{rundir.PREFIX}legacy-young"
    young.mkdir()
    (young / "qmp.sock").write_text("")
    foreign = parent / f"{rundir.PREFIX}attach-scratch"  # no sockets: not a runtime dir
    foreign.mkdir()
    _age(foreign)
    other = parent / "someone-else"
    other.mkdir()
    (other / "qmp.sock").write_text("")
    _age(other)
    assert rundir.sweep([parent], shm=shm) == [stale]
    assert bound.is_dir() and young.is_dir() and foreign.is_dir() and other.is_dir()


def test_legacy_ram_files_go_when_nobody_holds_them(parent: Path, shm: Path) -> None:
    stale = shm / f"{rundir.PREFIX}abc.ram"
    held = shm / f"{rundir.PREFIX}held.ram"
    young = shm / f"{rundir.PREFIX}young.ram"
    unrelated = shm / "other.ram"
    for path in (stale, held, young, unrelated):
        path.write_bytes(b"\0" * 4096)
    for path in (stale, held, unrelated):
        _age(path)
    with open(held, "rb"):
        assert rundir.sweep([parent], shm=shm) == [stale]
    assert held.exists() and young.exists() and unrelated.exists()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_owner_file_is_read_without_error(
    tmp_path_factory: pytest.TempPathFactory, text: bytes
) -> None:
    """A damaged ``owner`` file never raises: the directory counts as having no owner."""
    parent = tmp_path_factory.mktemp("owner")
    path = rundir.create(parent)
    (path / rundir.OWNER_FILE).write_bytes(text)
    verdict = rundir.owner_alive(path)
    fields = text.split()
    if verdict is not None:
        assert len(fields) == 2
    assert rundir.sweep([parent], shm=parent / "none") in ([], [path])
    if verdict is None:
        assert path.is_dir()  # young, no sockets: never swept
