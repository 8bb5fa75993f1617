"""cma_qemu.labgrid without QEMU: the console order and the env keys it refuses."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from cma_qemu.errors import EINVAL
from cma_qemu.labgrid import _console_first


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
