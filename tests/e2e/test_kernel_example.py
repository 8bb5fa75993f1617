"""The worked driver test: guest/kernel/examples/mfc_example.c, built with the same code as
``cma-qemu guest module build``, loaded into an Aquila guest, checked from the host.

It allocates like the 2010 Aquila MFC driver (firmware from s3c-mfc5/f, buffers from /a and
/b), fills each chunk through a write-combine memremap, and unloading frees them, by itself
or (leak=1) through cma_guest's sweep of a module's leftovers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from kmod_helpers import Daemon

from cma_qemu.guest_image import default_cache_dir
from cma_qemu.guest_image.build import guest_source_dir
from cma_qemu.guest_image.kmod import build_user_module
from cma_qemu.pytest_plugin import BoardSession

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "guest" / "kernel" / "examples"

#: the parameter, the region the Aquila map sends that kind to, the size and the pattern
BUFFERS = [
    ("fw_addr", "mfc_fw", 0x80000, 0xF1F10000),
    ("a_addr", "mfc_b1", 0x400000, 0xAAAA0000),
    ("b_addr", "mfc_b2", 0x200000, 0xBBBB0000),
]


@pytest.fixture(scope="session")
def example_ko() -> Path:
    built = build_user_module(
        EXAMPLE, "armmp-lpae", guest_source_dir(), default_cache_dir(), lambda _m: None
    )
    [ko] = built.modules
    return ko


@pytest.fixture
def aquila(cma_boot) -> Iterator[BoardSession]:
    session: BoardSession = cma_boot("aquila")
    daemon = Daemon(session)
    yield session
    session.guest.run("rmmod mfc_example 2>/dev/null")
    daemon.stop()
    session.agent.release_leftovers()


def _addresses(session: BoardSession) -> dict[str, int]:
    return {
        param: int(session.guest.check(f"cat /sys/module/mfc_example/parameters/{param}"))
        for param, *_ in BUFFERS
    }


def _check_buffers(session: BoardSession) -> set[int]:
    addrs = _addresses(session)
    live = {c.start: c for c in session.agent.guest_chunks()}
    kernel = f"guest:{session.agent.agent.port}/kernel"  # cma-test -k's "owner": "kernel"
    for param, region, size, pattern in BUFFERS:
        chunk = live[addrs[param]]  # the host's framework holds it for the guest
        assert chunk.owner == kernel, (param, chunk.owner)
        assert chunk.region is not None and chunk.region.name == region
        assert chunk.size == size
        words = struct.unpack(f"<{size // 4}I", session.agent.read(chunk.start, size))
        assert all(w == (pattern + i) & 0xFFFFFFFF for i, w in enumerate(words)), param
    assert addrs["fw_addr"] % 0x20000 == 0  # the firmware's 128K alignment
    return set(addrs.values())


def test_example_driver_allocates_like_the_mfc(aquila: BoardSession, example_ko: Path) -> None:
    aquila.guest.load_module(example_ko)  # the plugin's helper
    held = _check_buffers(aquila)
    assert "s3c-mfc5/f" in aquila.guest.check("dmesg | grep mfc_example")
    aquila.guest.check("rmmod mfc_example")
    assert not held & {c.start for c in aquila.agent.guest_chunks()}


def test_unload_frees_what_a_module_leaked(aquila: BoardSession, example_ko: Path) -> None:
    aquila.guest.load_module(example_ko, "leak=1")
    held = _check_buffers(aquila)
    aquila.guest.check("rmmod mfc_example")
    assert not held & {c.start for c in aquila.agent.guest_chunks()}
    assert aquila.guest.check("dmesg | grep -c 'mfc_example unloaded holding'") != "0"


def test_load_without_daemon_fails_with_enodev(cma_boot, example_ko: Path) -> None:
    session: BoardSession = cma_boot("aquila")
    with pytest.raises(Exception, match="No such device"):
        session.guest.load_module(example_ko)
    assert session.guest.run("lsmod | grep -c mfc_example").output == "0"


def test_guest_reset_gives_kernel_chunks_back(cma_boot, example_ko: Path) -> None:
    session: BoardSession = cma_boot("aquila")
    Daemon(session)  # the reset ends it, with the module and its chunks
    session.guest.load_module(example_ko, "leak=1")
    held = _check_buffers(session)
    session.agent.reset_guest()
    assert not held & {c.start for c in session.agent.guest_chunks()}
    assert session.guest.run("lsmod | grep -c mfc_example").output == "0"
