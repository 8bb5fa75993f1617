"""Loader math: zImage header parsing and QEMU 7.2 boot.c placement rules, without QEMU."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from cma_qemu.errors import EADDRINUSE, EINVAL, ENOENT
from cma_qemu.machine.loader import (
    KERNEL_LOAD_ADDR,
    LoadedRange,
    ZImageInfo,
    check_reservations,
    covering,
    dtb_load_size,
    kernel_footprint,
    loader_ranges,
    parse_zimage,
)

MiB = 1 << 20
BASE = 0x40000000


def make_zimage(
    size: int = 0x10000,
    decompressed: int = 0x1000000,
    bss: int = 0x60000,
    text_offset: int = 0x8000,
    *,
    table: bool = True,
) -> bytes:
    """A fake zImage with the header fields, the KLSZ table and the piggy size word."""
    data = bytearray(size)
    struct.pack_into("<3I", data, 0x24, 0x016F2818, 0, size)
    struct.pack_into("<I", data, 0x30, 0x04030201)
    piggy_size_addr = 0x801  # unaligned, like real kernels
    struct.pack_into("<I", data, piggy_size_addr, decompressed)
    if table:
        struct.pack_into("<2I", data, 0x34, 0x45454545, 0x400)
        struct.pack_into("<7I", data, 0x400, 6, 0x5A534C4B, piggy_size_addr, bss, text_offset,
                         0x10000, 0)  # fmt: skip
    else:
        struct.pack_into("<I", data, size - 4, decompressed)
    return bytes(data)


def test_parse_klsz_table() -> None:
    info = parse_zimage(make_zimage(decompressed=0x15A50C8, bss=0x601C0, text_offset=0x208000))
    assert info.decompressed_size == 0x15A50C8
    assert info.bss_size == 0x601C0
    assert info.text_offset == 0x208000
    assert info.malloc_size == 0x10000
    assert info.from_table


def test_parse_trailer_fallback() -> None:
    info = parse_zimage(make_zimage(decompressed=0x123000, table=False))
    assert info.decompressed_size == 0x123000
    assert info.text_offset == 0x8000
    assert not info.from_table


def test_not_a_zimage() -> None:
    with pytest.raises(EINVAL, match="not an ARM zImage"):
        parse_zimage(b"\0" * 0x100)
    with pytest.raises(EINVAL, match="too small"):
        parse_zimage(b"\0" * 8)


def test_parse_from_file(tmp_path: Path) -> None:
    p = tmp_path / "vmlinuz"
    p.write_bytes(make_zimage())
    assert parse_zimage(p).file_size == 0x10000


def test_virt_512m_layout_matches_qemu_7_2() -> None:
    # numbers seen in `info roms` for Debian 6.1 armmp-lpae on virt, 512 MiB
    z = make_zimage(size=0x545200, decompressed=0x15A50C8, bss=0x601C0, text_offset=0x208000)
    info = parse_zimage(z)
    ranges = loader_ranges("virt", BASE, 512 * MiB, info, 0xE35B4, dtb_load_size(1 << 20))
    assert [r.label for r in ranges] == ["bootloader", "kernel", "initrd", "dtb"]
    assert covering(ranges, "bootloader").start == BASE
    kernel = covering(ranges, "kernel")
    assert kernel.start == BASE + KERNEL_LOAD_ADDR
    # covers the zImage QEMU loads and the unpacked image with its BSS
    assert kernel.end >= BASE + KERNEL_LOAD_ADDR + 0x545200
    assert kernel.end >= BASE + 0x208000 + 0x15A50C8 + 0x601C0
    assert kernel.end <= BASE + 32 * MiB
    assert covering(ranges, "initrd") == LoadedRange("initrd", 0x48000000, 0xE35B4)
    assert covering(ranges, "dtb") == LoadedRange("dtb", 0x480E4000, 0x204E20)


def test_small_ram_puts_initrd_at_half() -> None:
    info = parse_zimage(make_zimage(decompressed=4 * MiB))
    ranges = loader_ranges("virt", BASE, 64 * MiB, info, 0x1000, 0x2000)
    assert covering(ranges, "initrd").start == BASE + 32 * MiB
    assert covering(ranges, "dtb").start == BASE + 32 * MiB + 0x1000


def test_initrd_never_below_the_loaded_image() -> None:
    # 16 MiB RAM: half is 8 MiB, but the raw image ends at 0x10000 + 9 MiB
    info = ZImageInfo(9 * MiB, 9 * MiB, 1 * MiB, 0, 0x8000, 0x10000, True)
    ranges = loader_ranges("virt", BASE, 16 * MiB, info, 100, 100)
    image_end = BASE + KERNEL_LOAD_ADDR + 9 * MiB
    assert covering(ranges, "initrd").start == image_end  # already page aligned
    info = ZImageInfo(9 * MiB + 1, 9 * MiB + 1, 1 * MiB, 0, 0x8000, 0x10000, True)
    ranges = loader_ranges("virt", BASE, 16 * MiB, info, 100, 100)
    assert covering(ranges, "initrd").start == image_end + 0x1000


def test_dtb_aligned_after_initrd_and_without_initrd() -> None:
    info = parse_zimage(make_zimage())
    r = loader_ranges("smdkc210", BASE, 1 << 30, info, 0x1001, 0x500)
    assert covering(r, "dtb").start == 0x48002000
    r = loader_ranges("smdkc210", BASE, 1 << 30, info, None, 0x500)
    assert covering(r, "dtb").start == 0x48000000
    with pytest.raises(ENOENT):
        covering(r, "initrd")


def test_dtb_load_size_is_qemus_padding() -> None:
    assert dtb_load_size(0x194C6 // 2 - 10000) == 0x194C6
    assert dtb_load_size(0) == 20000


def test_kernel_footprint_includes_page_tables_below_text() -> None:
    info = parse_zimage(make_zimage(text_offset=0x8000))
    start, size = kernel_footprint(info)
    assert start == 0x8000 - 0x5000
    assert (start + size) % 0x1000 == 0


def test_unknown_machine_and_overflow() -> None:
    info = parse_zimage(make_zimage())
    with pytest.raises(EINVAL, match="no loader rules"):
        loader_ranges("vexpress-a9", BASE, 64 * MiB, info, None, 0)
    with pytest.raises(EINVAL, match="does not fit"):
        loader_ranges("virt", BASE, 8 * MiB, info, 8 * MiB, 0x1000)


def test_check_reservations_names_both_ranges() -> None:
    info = parse_zimage(make_zimage(decompressed=20 * MiB))
    ranges = loader_ranges("virt", BASE, 512 * MiB, info, 1 * MiB, 0x10000)
    check_reservations(ranges, [("ok", 0x50000000, 16 * MiB), (None, 0x44000000, MiB)])
    with pytest.raises(EADDRINUSE) as err:
        check_reservations(ranges, [("mfc_b2", BASE, 16 * MiB)])
    assert "mfc_b2 0x40000000-0x40ffffff" in str(err.value)
    assert "bootloader 0x40000000" in str(err.value)
    with pytest.raises(EADDRINUSE, match=r"private region .* initrd 0x48000000"):
        check_reservations(ranges, [(None, 0x47F00000, 2 * MiB)])


def test_loaded_range_overlap_edges() -> None:
    r = LoadedRange("x", 0x1000, 0x1000)
    assert not r.overlaps(0, 0x1000)
    assert r.overlaps(0, 0x1001)
    assert not r.overlaps(0x2000, 0x10)
    assert r.overlaps(0x1FFF, 1)
    assert str(r) == "x 0x1000-0x1fff"
