"""cma_qemu.labgrid without QEMU: the console order and the env keys it refuses."""

from __future__ import annotations

import shlex
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from cma_qemu.errors import EINVAL
from cma_qemu.labgrid import _console_first, _dies_with_parent, _dies_with_this_thread


def test_labgrids_console_becomes_the_first_serial_port() -> None:
    uart_board = [
        "q", "-chardev", "socket,id=cma0", "-serial", "chardev:cma0", "-S",
        "-chardev", "socket,id=serialsocket", "-serial", "chardev:serialsocket",
    ]  # fmt: skip
    assert _console_first(uart_board) == [
        "q", "-chardev", "socket,id=cma0", "-serial", "chardev:serialsocket",
        "-serial", "chardev:cma0", "-S", "-chardev", "socket,id=serialsocket",
    ]  # fmt: skip
    virtio_board = ["q", "-device", "virtserialport", "-serial", "chardev:serialsocket"]
    assert _console_first(virtio_board) == virtio_board


def test_pdeathsig_only_from_the_main_thread() -> None:
    """PR_SET_PDEATHSIG fires when the starting thread ends: a worker thread's would kill
    the process with the thread, so only the main thread gets the prefix."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "util-linux's setpriv is missing"
    assert _dies_with_this_thread(["ssh", "h"]) == [
        setpriv,
        "--pdeathsig",
        "KILL",
        "--",
        "ssh",
        "h",
    ]
    from_worker: list[list[str]] = []
    worker = threading.Thread(target=lambda: from_worker.append(_dies_with_this_thread(["ssh"])))
    worker.start()
    worker.join()
    assert from_worker == [["ssh"]]


def test_the_remote_command_is_quoted_for_the_hosts_shell() -> None:
    command = _dies_with_parent(["cma-qemu", "attach", "--map=a b;rm"], "TERM")
    assert command.startswith("exec ")
    assert shlex.split(command[5:]) == [
        "setpriv", "--pdeathsig", "TERM", "--", "cma-qemu", "attach", "--map=a b;rm",
    ]  # fmt: skip


def env_file(tmp_path: Path, driver: str) -> Path:
    path = tmp_path / "env.yaml"
    path.write_text(
        "targets:\n  main:\n    drivers:\n"
        f"      CmaQemuDriver: {{{driver}}}\n"
        "imports:\n  - cma_qemu.labgrid\n"
    )
    return path


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("board: virt, kernel: k", "'kernel' is set by board 'virt'"),
        ("board: virt, machine: vexpress-a9", "board virt is machine virt"),
        ("board: aquila, memory: 512M", "board aquila has 384M of RAM"),
    ],
)
def test_keys_the_board_owns_are_refused_on_activation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: str, message: str
) -> None:
    from labgrid import Environment

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # labgrid's and the driver's dirs
    env = Environment(str(env_file(tmp_path, keys)))
    try:
        target = env.get_target()
        driver = target.get_driver("CmaQemuDriver", activate=False)
        with pytest.raises(EINVAL, match=message):
            target.activate(driver)
        assert not driver._cma_dir
        assert list(scratch.iterdir()) == []  # labgrid's console dir and the driver's: gone
    finally:
        env.cleanup()
