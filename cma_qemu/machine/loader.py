"""Where QEMU 7.2's ARM direct-kernel loader (hw/arm/boot.c) puts things in guest RAM.

Early CMA regions must not overlap anything the loader writes or the kernel unpacks, and the
agent has to know that *before* QEMU starts, so the ranges are computed from boot.c's rules
rather than read back from ``info roms`` (the e2e tests check that both agree):

* a 28-byte boot stub at ``loader_start`` (= RAM base on virt and smdkc210);
* a raw (32-bit zImage) kernel at ``loader_start + KERNEL_LOAD_ADDR`` (0x10000);
* the initrd at ``loader_start + min(ram_size / 2, 128 MiB)``, moved above the loaded kernel
  image if that is higher, page aligned;
* the DTB right after the initrd, aligned to 4 KiB ("some 32-bit kernels trash the page the
  initrd ends in"); with ``-dtb FILE`` QEMU sizes the blob ``(file size + 10000) * 2``.

The kernel range is the kernel's own footprint, which is larger than the zImage: the
decompressor unpacks to ``RAM base + TEXT_OFFSET`` (0x8000 usually, 0x208000 in Debian's armmp
kernels because they include Meson support), the image then needs its BSS, and when the
unpacked kernel would overwrite the running decompressor, the decompressor first copies itself
past the end of the unpacked image (with its own BSS, stack and malloc arena). The initial page
tables sit just below TEXT_OFFSET. All of these numbers come from the zImage's header and its
``KLSZ`` extension table; only a kernel without that table falls back to the trailer rule (the
last 4 bytes hold the decompressed size) and default TEXT_OFFSET / BSS margins.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cma_qemu.errors import EADDRINUSE, EINVAL, ENOENT
from cma_qemu.machine.profiles import machine_profile
from cma_qemu.units import KiB, MiB, align_up, ranges_overlap

__all__ = [
    "DTB_ALIGN",
    "INITRD_MAX_OFFSET",
    "KERNEL_LOAD_ADDR",
    "LoadedRange",
    "ZImageInfo",
    "check_reservations",
    "covering",
    "dtb_load_size",
    "kernel_footprint",
    "loader_ranges",
    "parse_zimage",
]

#: boot.c: raw kernels are loaded this far into RAM.
KERNEL_LOAD_ADDR = 0x10000
#: boot.c: the initrd goes at most this far into RAM (half of RAM on small boards).
INITRD_MAX_OFFSET = 128 * MiB
#: boot.c: 32-bit guests get their DTB aligned to a page after the initrd.
DTB_ALIGN = 4 * KiB
#: boot.c's boot stub: a handful of instructions at loader_start (0x1c bytes in 7.2).
BOOTLOADER_SIZE = 4 * KiB
#: Bytes QEMU's load_device_tree() adds to a ``-dtb`` file before doubling it.
DTB_PAD = 10000
#: Page tables below TEXT_OFFSET: 16 KiB classic, 20 KiB with LPAE (take the larger).
PAGE_TABLE_SIZE = 0x5000
#: Decompressor stack (4 KiB) and slack for the relocation code rounding.
DECOMPRESSOR_STACK = 4 * KiB + 256
#: Defaults for zImages without a KLSZ table (pre-4.x kernels).
DEFAULT_TEXT_OFFSET = 0x8000
DEFAULT_MALLOC_SIZE = 64 * KiB
DEFAULT_BSS_MARGIN = 1 * MiB

_ZIMAGE_MAGIC = 0x016F2818
_KLSZ = 0x5A534C4B  # "KLSZ" little-endian: the kernel size table entry


@dataclass(frozen=True, slots=True)
class LoadedRange:
    """One guest-physical range that QEMU loads or the booting kernel occupies."""

    label: str
    start: int
    size: int

    @property
    def end(self) -> int:
        """Exclusive end address."""
        return self.start + self.size

    def overlaps(self, start: int, size: int) -> bool:
        """True if ``[start, start + size)`` shares at least one byte with this range."""
        return ranges_overlap(start, start + size, self.start, self.end)

    def __str__(self) -> str:
        return f"{self.label} {self.start:#x}-{self.end - 1:#x}"


@dataclass(frozen=True, slots=True)
class ZImageInfo:
    """What a 32-bit ARM zImage says about its unpacked footprint."""

    file_size: int
    #: The zImage's own end (``_edata``), which its BSS/stack/malloc follow.
    image_end: int
    decompressed_size: int
    bss_size: int
    text_offset: int
    malloc_size: int
    #: False when the numbers came from the trailer rule and defaults.
    from_table: bool


def parse_zimage(kernel: Path | bytes) -> ZImageInfo:
    """Read the sizes from a zImage's header and KLSZ table (or trailer, for old kernels)."""
    data = kernel if isinstance(kernel, bytes) else Path(kernel).read_bytes()
    where = "kernel" if isinstance(kernel, bytes) else str(kernel)
    if len(data) < 0x40:
        raise EINVAL("file too small to be a zImage", where=where)
    magic, start, end = struct.unpack_from("<3I", data, 0x24)
    if magic != _ZIMAGE_MAGIC:
        raise EINVAL(
            f"not an ARM zImage (magic {magic:#x} at 0x24, want {_ZIMAGE_MAGIC:#x})", where=where
        )
    image_end = end - start if end > start else len(data)
    table = _klsz_table(data)
    if table is not None:
        piggy_size_addr, bss, text_offset, malloc_size = table
        if piggy_size_addr + 4 > len(data):
            raise EINVAL("KLSZ table points outside the file", where=where)
        (decompressed,) = struct.unpack_from("<I", data, piggy_size_addr)
        return ZImageInfo(
            len(data), image_end, decompressed, bss, text_offset, malloc_size, from_table=True
        )
    (decompressed,) = struct.unpack_from("<I", data, len(data) - 4)
    if decompressed == 0:
        raise EINVAL("zImage has no KLSZ table and no size trailer", where=where)
    return ZImageInfo(
        len(data),
        image_end,
        decompressed,
        DEFAULT_BSS_MARGIN,
        DEFAULT_TEXT_OFFSET,
        DEFAULT_MALLOC_SIZE,
        from_table=False,
    )


def _klsz_table(data: bytes) -> tuple[int, int, int, int] | None:
    """The KLSZ entry (piggy size address, BSS, TEXT_OFFSET, malloc) if the zImage has one.

    Header word 0x34 is 0x45454545 when word 0x38 holds the table offset; each table entry is
    ``[n_words, tag, value...]`` with ``n_words`` counting itself, ended by a 0 word.
    """
    marker, offset = struct.unpack_from("<2I", data, 0x34)
    if marker != 0x45454545:
        return None
    while 0 < offset <= len(data) - 8:
        n_words, tag = struct.unpack_from("<2I", data, offset)
        if n_words == 0 or offset + 4 * n_words > len(data):
            return None
        if tag == _KLSZ and n_words >= 6:
            values = struct.unpack_from("<4I", data, offset + 8)
            return values[0], values[1], values[2], values[3]
        offset += 4 * n_words
    return None


def dtb_load_size(dtb_file_size: int) -> int:
    """Bytes QEMU reserves for a ``-dtb`` file in guest RAM: ``(size + 10000) * 2``."""
    return (dtb_file_size + DTB_PAD) * 2


def kernel_footprint(info: ZImageInfo) -> tuple[int, int]:
    """``(offset, size)`` from the RAM base that the zImage and the kernel it unpacks use."""
    unpacked_end = info.text_offset + info.decompressed_size
    # The decompressor copies itself (with its BSS, stack and malloc arena) behind the
    # unpacked image when the two would collide; take that always, it costs a few MiB at most.
    relocated_end = (
        align_up(unpacked_end, 256)
        + DECOMPRESSOR_STACK
        + align_up(info.image_end, 32)
        + info.malloc_size
        + 64 * KiB  # the decompressor's own BSS, generously
    )
    end = max(unpacked_end + info.bss_size, relocated_end, KERNEL_LOAD_ADDR + info.file_size)
    start = min(KERNEL_LOAD_ADDR, info.text_offset - PAGE_TABLE_SIZE)
    return start, align_up(end, 4 * KiB) - start


def loader_ranges(
    machine_type: str,
    ram_base: int,
    ram_size: int,
    kernel: Path | ZImageInfo,
    initrd: Path | int | None,
    dtb_size_budget: int,
) -> list[LoadedRange]:
    """The ranges QEMU 7.2 loads into (or the kernel unpacks to) for a direct kernel boot.

    ``machine_type`` is the ``-M`` value; both supported boards use ``loader_start = RAM
    base``. ``initrd`` is a path or its size; ``dtb_size_budget`` is what QEMU reserves for
    the DTB (:func:`dtb_load_size` of the ``-dtb`` file). Ranges come back in address order.
    """
    machine_profile(machine_type, "loader rules")
    if ram_size <= 0:
        raise EINVAL("RAM size must be positive", where="machine")
    info = kernel if isinstance(kernel, ZImageInfo) else parse_zimage(kernel)
    k_off, k_size = kernel_footprint(info)
    ranges = [
        LoadedRange("bootloader", ram_base, BOOTLOADER_SIZE),
        LoadedRange("kernel", ram_base + k_off, k_size),
    ]
    # boot.c: the raw image is [entry, entry + file size); the initrd may not start below it.
    image_high = ram_base + KERNEL_LOAD_ADDR + info.file_size
    initrd_start = ram_base + min(ram_size // 2, INITRD_MAX_OFFSET)
    initrd_start = align_up(max(initrd_start, image_high), 4 * KiB)
    initrd_size = 0
    if initrd is not None:
        initrd_size = initrd if isinstance(initrd, int) else Path(initrd).stat().st_size
        ranges.append(LoadedRange("initrd", initrd_start, initrd_size))
    dtb_start = align_up(initrd_start + initrd_size, DTB_ALIGN)
    ranges.append(LoadedRange("dtb", dtb_start, dtb_size_budget))
    ram_end = ram_base + ram_size
    for r in ranges:
        if r.end > ram_end:
            raise EINVAL(f"{r} does not fit in RAM {ram_base:#x}-{ram_end - 1:#x}", where="machine")
    return sorted(ranges, key=lambda r: r.start)


def check_reservations(
    loaded: Iterable[LoadedRange],
    reservations: Iterable[tuple[str | None, int, int]],
) -> None:
    """Raise EADDRINUSE naming both ranges if a reservation overlaps a loaded range."""
    loaded = list(loaded)
    for name, start, size in reservations:
        for r in loaded:
            if r.overlaps(start, size):
                label = name or "private region"
                raise EADDRINUSE(
                    f"{label} {start:#x}-{start + size - 1:#x} overlaps the {r} that QEMU "
                    "loads into guest RAM",
                    where=label,
                )


def covering(ranges: Sequence[LoadedRange], label: str) -> LoadedRange:
    """The range with ``label`` (``"kernel"``, ``"initrd"``, ...)."""
    for r in ranges:
        if r.label == label:
            return r
    raise ENOENT(f"no loaded range named {label!r}")
