"""Guest memory: mmap of a RAM file with bounds checks, pmemsave through a fake QMP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cma_qemu.errors import EBADFD, EINVAL, EIO, EOPNOTSUPP
from cma_qemu.machine import memory as memory_mod
from cma_qemu.machine.memory import MmapGuestMemory, PmemsaveGuestMemory

BASE = 0x40000000
SIZE = 1 << 20


@pytest.fixture
def ram_file(tmp_path: Path) -> Path:
    p = tmp_path / "ram"
    p.write_bytes(bytes(range(256)) * (SIZE // 256))
    return p


async def test_mmap_read_write(ram_file: Path) -> None:
    mem = MmapGuestMemory(ram_file, BASE, SIZE)
    assert await mem.read(BASE + 1, 3) == b"\x01\x02\x03"
    await mem.write(BASE + SIZE - 4, b"\xde\xad\xbe\xef")
    assert ram_file.read_bytes()[-4:] == b"\xde\xad\xbe\xef"  # visible through the file at once
    assert mem.read_sync(BASE + SIZE - 4, 4) == b"\xde\xad\xbe\xef"
    view = mem.view(BASE, 2)
    assert bytes(view) == b"\x00\x01"
    view.release()
    assert await mem.read(BASE, 0) == b""
    await mem.close()
    await mem.close()  # idempotent
    with pytest.raises(EBADFD):
        await mem.read(BASE, 1)


@pytest.mark.parametrize(
    ("addr", "size"),
    [(BASE - 1, 1), (BASE + SIZE, 1), (BASE + SIZE - 1, 2), (0, 4), (BASE, SIZE + 1)],
)
async def test_mmap_bounds(ram_file: Path, addr: int, size: int) -> None:
    mem = MmapGuestMemory(ram_file, BASE, SIZE)
    with pytest.raises(EINVAL, match="not inside guest RAM \\(0x40000000-0x400fffff\\)"):
        await mem.read(addr, size)
    with pytest.raises(EINVAL):
        await mem.write(addr, b"x" * size)
    with pytest.raises(EINVAL, match="negative"):
        await mem.read(BASE, -1)
    await mem.close()


async def test_banks_with_a_hole(ram_file: Path) -> None:
    half = SIZE // 2
    mem = MmapGuestMemory(ram_file, BASE, SIZE, [(BASE, half // 2), (BASE + half, half)])
    assert len(await mem.read(BASE + half, 16)) == 16
    with pytest.raises(EINVAL):
        await mem.read(BASE + half // 2, 1)  # in the hole
    await mem.close()


def test_file_too_small(tmp_path: Path) -> None:
    p = tmp_path / "small"
    p.write_bytes(b"\0" * 4096)
    with pytest.raises(EINVAL, match="RAM file has"):
        MmapGuestMemory(p, BASE, SIZE)
    with pytest.raises(EIO, match="cannot open"):
        MmapGuestMemory(tmp_path / "missing", BASE, SIZE)


async def test_read_only_mapping(ram_file: Path) -> None:
    mem = MmapGuestMemory(ram_file, BASE, SIZE, writable=False)
    with pytest.raises(EOPNOTSUPP):
        await mem.write(BASE, b"x")
    await mem.close()


class FakeQmp:
    """pmemsave writes the requested slice of ``ram`` to the file, like QEMU."""

    def __init__(self, ram: bytes, fail: bool = False) -> None:
        self.ram = ram
        self.calls: list[dict[str, Any]] = []
        self.fail = fail

    async def execute(
        self, cmd: str, arguments: dict[str, Any] | None = None, oob: bool = False
    ) -> object:
        assert cmd == "pmemsave" and arguments is not None
        self.calls.append(arguments)
        if self.fail:
            raise RuntimeError("boom")
        off = arguments["val"] - BASE
        Path(arguments["filename"]).write_bytes(self.ram[off : off + arguments["size"]])
        return {}


async def test_pmemsave_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ram = bytes(range(256)) * (SIZE // 256)
    qmp = FakeQmp(ram)
    mem = PmemsaveGuestMemory(qmp, tmp_path, BASE, SIZE)
    assert await mem.read(BASE + 0x100, 8) == ram[0x100:0x108]
    monkeypatch.setattr(memory_mod, "PMEMSAVE_CHUNK", 0x1000)
    assert await mem.read(BASE, 0x2800) == ram[:0x2800]
    assert [c["size"] for c in qmp.calls[1:]] == [0x1000, 0x1000, 0x800]
    assert list(tmp_path.iterdir()) == []  # temp files removed
    with pytest.raises(EOPNOTSUPP, match="pmemsave"):
        await mem.write(BASE, b"x")
    with pytest.raises(EINVAL):
        await mem.read(BASE + SIZE, 1)
    await mem.close()
    with pytest.raises(EBADFD):
        await mem.read(BASE, 1)


async def test_pmemsave_failure_is_eio(tmp_path: Path) -> None:
    mem = PmemsaveGuestMemory(FakeQmp(b"", fail=True), tmp_path, BASE, SIZE)
    with pytest.raises(EIO, match="pmemsave 0x40000000"):
        await mem.read(BASE, 4)
    assert list(tmp_path.iterdir()) == []
